"""Time TRL's DPOTrainer step against ours (adv_weight=0): same model, batch, length and precision.

    python -m venv --system-site-packages /tmp/trlenv && /tmp/trlenv/bin/pip install --no-deps trl==1.16.0
    HF_HUB_OFFLINE=1 /tmp/trlenv/bin/python scripts/bench_trl.py          # SmolLM2-135M, 4 pairs x 256, fp32

TRL is not a project dependency; install it in a scratch environment only for this comparison.
One optimizer step is what TRL's Trainer loop does per batch: `training_step` (policy forward and
backward, reference forward), gradient clipping, AdamW step. Ours is `ganpo.ganpo_step` with λ = 0.
The two run strictly alternating (TRL, ours, TRL, ours, ...) after a warm-up step each, on the same
random token ids (bench.py's batch), collated by each library's own collator; we report the median
seconds per step with the spread, and the median of the per-pair ratios.

    HF_HUB_OFFLINE=1 /tmp/trlenv/bin/python scripts/bench_trl.py --steps 8
    HF_HUB_OFFLINE=1 /tmp/trlenv/bin/python scripts/bench_trl.py --heads     # the LM-head part alone
    HF_HUB_OFFLINE=1 /tmp/trlenv/bin/python scripts/bench_trl.py --profile   # where the difference is, by operator

--heads times only the part where the two steps differ most: from the last hidden states to the
summed log-probs and back (forward + backward of the policy's LM head), on the same hidden states.
TRL's head is its fused chunked log-prob function (TRL's ChunkedLogProbFunction, called as its trainer
calls it), once over every position as TRL does on CPU, and once over completion positions only, as
it does where Triton runs (CUDA, XPU); ours is ganpo.py's chunked, checkpointed head.

--profile runs --steps steps of each (after the warm-ups, alternating as above) under torch.profiler
and prints, per operator, the self CPU seconds of TRL's steps and of ours, largest difference first:
the whole-step difference taken apart (the profiler slows both, code of many small operations most).
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import trl
from datasets import Dataset
from transformers import HfArgumentParser
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ganpo  # noqa: E402
import loading  # noqa: E402
import scaleout  # noqa: E402
from bench import BenchConfig, random_examples, setup  # noqa: E402


@dataclass
class TrlBenchConfig:
    heads: bool = field(default=False, metadata={"help": "time the LM-head part alone (see the docstring)"})
    profile: bool = field(default=False, metadata={"help": "profile --steps steps of each: where the time difference is"})


def time_heads(cfg, model, examples, device):
    """Forward + backward from the last hidden states to the summed log-probs: TRL's head vs ours."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    batch = {k: v.to(device) for k, v in loading.collate(examples, 0).items()}
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    scored = batch["completion_mask"][:, 1:]  # position t scores token t+1
    rows = {"all": (hidden[:, :-1].reshape(-1, hidden.shape[-1]), batch["input_ids"][:, 1:].reshape(-1)),
            "completion": (hidden[:, :-1][scored], batch["input_ids"][:, 1:][scored])}
    lm_head = model.get_output_embeddings()
    trl_outputs = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer asks its policy head for

    def trl_head(which):
        h, labels = rows[which]
        h = h.detach().requires_grad_()
        logps = ChunkedLogProbFunction.apply(h, lm_head.weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                              None, 1.0, trl_outputs)[0]
        logps.sum().backward()

    def our_head():
        h, labels = rows["completion"]
        h = h.detach().requires_grad_()
        ganpo.chunked_token_logps(lm_head, h, labels, cfg.logits_chunk or 10 ** 12).sum().backward()  # 0: one chunk, as bench.py

    heads = {f"trl, all {rows['all'][0].shape[0]} positions": lambda: trl_head("all"),
             f"trl, {rows['completion'][0].shape[0]} completion positions": lambda: trl_head("completion"),
             f"ours, {rows['completion'][0].shape[0]} completion positions": our_head}
    times = {k: [] for k in heads}
    for fn in heads.values():  # warm-up
        fn()
    for i in range(cfg.steps):  # alternating, as the whole steps
        for name, fn in heads.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"trl {trl.__version__} | {cfg.model} | LM head forward + backward, {cfg.batch_size} pairs x {cfg.max_length} "
          f"tokens, fp32 | {cfg.steps} times each, alternating")
    for name, v in times.items():
        print(f"{name:32s} median {statistics.median(v):6.3f} s | min {min(v):.3f} max {max(v):.3f}")


def profile_steps(steps, n):
    """Self CPU seconds per operator over n steps of each, alternating; largest difference first."""
    from torch.profiler import ProfilerActivity, profile

    per_op, totals = {}, {}
    for _ in range(n):
        for name, fn in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                fn()
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
            for e in prof.key_averages():
                per_op.setdefault(e.key, {"trl": 0.0, "ours": 0.0})[name] += e.self_cpu_time_total / 1e6
    print(f"trl {trl.__version__} | {n} profiled step(s) each, alternating | wall s: trl {totals['trl']:.2f}, "
          f"ours {totals['ours']:.2f} (the profiler adds overhead)")
    print(f"{'operator (self CPU s, summed over steps)':44s} {'trl':>8s} {'ours':>8s} {'trl-ours':>9s}")
    rows = sorted(per_op.items(), key=lambda kv: -abs(kv[1]["trl"] - kv[1]["ours"]))
    for key, v in rows[:20]:
        print(f"{key[:44]:44s} {v['trl']:8.2f} {v['ours']:8.2f} {v['trl'] - v['ours']:9.2f}")
    rest = {k: sum(v[k] for _, v in rows[20:]) for k in ("trl", "ours")}
    all_ = {k: sum(v[k] for v in per_op.values()) for k in ("trl", "ours")}
    print(f"{'(all other operators)':44s} {rest['trl']:8.2f} {rest['ours']:8.2f} {rest['trl'] - rest['ours']:9.2f}")
    print(f"{'(total self CPU)':44s} {all_['trl']:8.2f} {all_['ours']:8.2f} {all_['trl'] - all_['ours']:9.2f}")


def main():
    cfg, trl_cfg = HfArgumentParser((BenchConfig, TrlBenchConfig)).parse_args_into_dataclasses()
    if trl_cfg.heads:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = loading.load_policy(cfg.model, loading.load_tokenizer(cfg.model), cfg.seed).to(device)
        return time_heads(cfg, model, random_examples(model.config.vocab_size, cfg.batch_size, cfg.max_length, cfg.seed),
                          device)
    our_step, device, _ = setup(cfg, ["dpo"])  # bench.py's DPO update (λ = 0) on its random batch
    use_bf16, _ = scaleout.precision(device, cfg.dtype)
    tokenizer = loading.load_tokenizer(cfg.model)
    theirs = loading.load_policy(cfg.model, tokenizer, cfg.seed).to(device).train()
    examples = random_examples(theirs.config.vocab_size, cfg.batch_size, cfg.max_length, cfg.seed)  # the same ids

    args = DPOConfig(output_dir="/tmp/bench_trl", report_to=[], per_device_train_batch_size=cfg.batch_size,
                     learning_rate=1e-6, max_grad_norm=1.0, bf16=use_bf16, use_cpu=device == "cpu",
                     gradient_checkpointing=cfg.gradient_checkpointing, max_length=None,
                     gradient_checkpointing_kwargs={"use_reentrant": False})
    dummy = Dataset.from_list([{"prompt": "Hello.\n", "chosen": "Hi.", "rejected": "Go."}])  # TRL wants a dataset; we pass batches
    trainer = DPOTrainer(model=theirs, ref_model=ganpo.make_reference(theirs), args=args, train_dataset=dummy,
                         processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which we do not call
    trl_inputs = trainer.data_collator([{"prompt_ids": e["prompt"], "chosen_ids": e["chosen"],
                                         "rejected_ids": e["rejected"]} for e in examples])
    trl_inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in trl_inputs.items()}

    def trl_step():
        trainer.model.train()
        trainer.training_step(trainer.model, trl_inputs)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    steps = {"trl": trl_step, "ours": lambda: our_step("dpo")}
    times = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn()
    if trl_cfg.profile:
        return profile_steps(steps, cfg.steps)
    for i in range(cfg.steps):  # strictly alternating: TRL, ours, TRL, ours, ... so both see the same machine
        for name in steps:
            t0 = time.perf_counter()
            steps[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    print(f"trl {trl.__version__} | {cfg.model} | {cfg.batch_size} pairs x {cfg.max_length} tokens | "
          f"{'bf16 autocast' if use_bf16 else 'fp32'} | {cfg.steps} steps each, alternating")
    for k in steps:
        v = sorted(times[k])
        print(f"{k:5s} median {statistics.median(v):7.3f} s/step | min {v[0]:.3f} max {v[-1]:.3f} | "
              f"all: {', '.join(f'{t:.2f}' for t in times[k])}")
    ratios = sorted(o / t for o, t in zip(times["ours"], times["trl"]))  # each of our steps against the TRL step before it
    print(f"ours/TRL time per DPO step: median {statistics.median(ratios):.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}, "
          f"over {len(ratios)} adjacent pairs); ratio of medians "
          f"{statistics.median(times['ours']) / statistics.median(times['trl']):.3f}")


if __name__ == "__main__":
    main()
