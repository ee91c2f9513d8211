"""Confirm that a machine with one NVIDIA GPU keeps the README's promise, in one command.

    python scripts/gpu_check.py                      # one table; the record in gpu_check.json
    python scripts/gpu_check.py --out FILE.json      # the record elsewhere

Five checks, about 2-4 minutes on a recent GPU (SmolLM2-135M, the bundled data):
  environment  torch, CUDA, the GPU, native bf16 (scaleout.native_bf16), NCCL
  bench        bench.py --gradient_checkpointing: GANPO/DPO time and memory ratios, MFU
  train        train.py, bf16 autocast + gradient checkpointing, 16 steps: at step 0 the DPO loss
               is ln 2 and the rewards are 0; the held-out loss at the end is below ln 2
  torchrun     torchrun, 1 process (NCCL), 2 steps: the FSDP2 path
  lora         train.py --lora_r 8, 2 steps: an adapter is saved
Without a CUDA device it stops at once with one line. `--allow_cpu --model tiny` runs the same
checks on the CPU (train.py picks the device itself): that is how test_ganpo.py tests this script.
Each check runs as a user runs it, in a process of its own, in a temporary folder.
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import loading  # noqa: E402
import scaleout  # noqa: E402


def environment():
    """-> what this machine offers: torch, CUDA, the device, native bf16, NCCL."""
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
            "native_bf16": scaleout.native_bf16("cuda" if cuda else "cpu"),
            "nccl": torch.distributed.is_nccl_available()}


def run(cmd, timeout):
    """Run cmd in the repository root -> (exit status, output, seconds)."""
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return out.returncode, out.stdout + out.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout} s\n{e.stdout or ''}", time.time() - t0


def records(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def judge_bench(output, folder):
    result = json.loads(output.strip().splitlines()[-1])
    figures = {"time_ratio": result["time_ratio"], "memory_ratio": result["memory_ratio"],
               "mfu_dpo": (result["mfu"] or {}).get("dpo"), "mfu_ganpo": (result["mfu"] or {}).get("ganpo"),
               "precision": result["precision"]}
    return figures, []


def judge_train(output, folder):
    rows = records(folder)
    steps = [r for r in rows if "split" not in r]
    final = [r for r in rows if "split" in r][-1]
    first = steps[0]
    figures = {"step0_loss": first["opo/loss"], "step0_rewards": [first["rewards/chosen"],
                                                                  first["rewards/rejected"]],
               "final_heldout_loss": final["eval/opo/loss"], "steps": len(steps)}
    problems = []
    if abs(first["opo/loss"] - math.log(2)) > 1e-4 or first["rewards/chosen"] or first["rewards/rejected"]:
        problems.append("step 0 is not DPO's ln 2 with zero rewards: policy and reference differ")
    if not final["eval/opo/loss"] < math.log(2):
        problems.append(f"held-out loss {final['eval/opo/loss']:.4f} did not fall below ln 2")
    return figures, problems


def judge_steps(n, weights):
    def judge(output, folder):
        steps = [r for r in records(folder) if "split" not in r]
        problems = [] if len(steps) == n and all(math.isfinite(r["loss"]) for r in steps) else \
            [f"expected {n} finite steps in metrics.jsonl, found {len(steps)}"]
        if not os.path.isfile(os.path.join(folder, weights)):
            problems.append(f"no {weights} saved")
        return {"steps": len(steps), "last_loss": steps[-1]["loss"] if steps else None}, problems
    return judge


def checks(args, work):
    """-> [(name, command, judge(output, run folder) -> (figures, problems), run folder)]."""
    py, model = sys.executable, ["--model", args.model]
    run_flags = [*model, "--dtype", args.dtype, "--eval_every", "0", "--log_every", "1"]
    folder = {name: os.path.join(work, name) for name in ("train", "torchrun", "lora")}
    return [
        ("bench", [py, "bench.py", *model, "--dtype", args.dtype, "--gradient_checkpointing",
                   "--json", *shlex.split(args.bench_flags)], judge_bench, None),
        ("train", [py, "train.py", *run_flags, "--gradient_checkpointing", "--max_steps",
                   str(args.train_steps), "--output_dir", folder["train"],
                   *shlex.split(args.train_flags)], judge_train, folder["train"]),
        ("torchrun", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                      "train.py", *run_flags, "--max_steps", "2", "--output_dir", folder["torchrun"]],
         judge_steps(2, "model.safetensors"), folder["torchrun"]),
        ("lora", [py, "train.py", *run_flags, "--lora_r", "8", "--max_steps", "2", "--output_dir",
                  folder["lora"]], judge_steps(2, "adapter_model.safetensors"), folder["lora"]),
    ]


def check(name, cmd, judge, folder, timeout):
    """Run one check -> its row of the record."""
    code, output, seconds = run(cmd, timeout)
    row = {"check": name, "command": shlex.join(cmd[1:]), "seconds": round(seconds, 1)}
    if code != 0:
        return {**row, "ok": False, "problems": [f"exit {code}: " + (output.strip().splitlines() or ["?"])[-1]]}
    try:
        figures, problems = judge(output, folder)
    except (OSError, ValueError, KeyError, IndexError) as e:
        figures, problems = {}, [f"could not read its results: {e!r}"]
    return {**row, "ok": not problems, "figures": figures, "problems": problems}


def show(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "/".join(show(v) for v in value)
    return str(value)


def table(env, rows):
    lines = [f"environment: torch {env['torch']}, CUDA {env['cuda']}, {env['device']}"
             f" (compute {env['capability']}), native bf16 {env['native_bf16']}, NCCL {env['nccl']}",
             f"{'check':10s} {'result':6s} {'seconds':>8s}  figures / problems"]
    for r in rows:
        figures = ", ".join(f"{k} {show(v)}" for k, v in r.get("figures", {}).items())
        lines.append(f"{r['check']:10s} {'ok' if r['ok'] else 'FAILED':6s} {r['seconds']:8.1f}  "
                     + "; ".join(r["problems"] or [figures]))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="where the JSON record goes")
    p.add_argument("--model", default="smollm2", help="as train.py --model")
    p.add_argument("--dtype", default="bf16", help="train.py/bench.py --dtype (the promise: bf16)")
    p.add_argument("--train_steps", type=int, default=16, help="steps of the bf16 + checkpointing run")
    p.add_argument("--train_flags", default="", help="more train.py flags for that run")
    p.add_argument("--bench_flags", default="", help="more bench.py flags")
    p.add_argument("--timeout", type=int, default=300, help="seconds each check may take")
    p.add_argument("--allow_cpu", action="store_true", help="run without a GPU (to test this script)")
    args = p.parse_args(argv)
    env = environment()
    if not env["cuda_available"] and not args.allow_cpu:
        sys.exit("error: no CUDA device: scripts/gpu_check.py checks a GPU machine "
                 f"(torch {env['torch']} sees none)")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        rows = [check(*c, args.timeout) for c in checks(args, work)]
    print(table(env, rows))
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": env, "checks": rows,
              "ok": all(r["ok"] for r in rows)}
    loading.write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(f"{'all checks passed' if record['ok'] else 'some checks FAILED'}; record: {args.out}")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
