"""The controlled experiment: DPO vs GANPO under label noise, in distribution and under shift.

    python experiments/run.py                        # every cell not done yet (about 20 min a cell on 2 CPU cores)
    python experiments/run.py --only ganpo-n0.2-s0   # some cells (comma list of names)
    python experiments/run.py --dry_run              # list the cells and their commands
    python experiments/run.py --report               # table (results.md) and figure (results.png) from finished cells
    python experiments/run.py --only dpo-n0-s0 --results /tmp/check && \
        python experiments/run.py --compare /tmp/check   # rerun a cell elsewhere, check its figures match

A cell is method x label noise x seed. It trains with train.py's defaults (SmolLM2-135M-Instruct,
bundled data, 32 steps of 8 pairs) plus the method's flags, --label_noise and --seed, then scores
the saved policy with eval.py on `test` and `shift` at eval.py's default temperatures. DPO and
GANPO cells of one seed see the same pairs in the same order. A cell is done when
experiments/results/CELL.json exists (written atomically at its end): an interrupted grid goes on
with the next unfinished cell, and an interrupted training run resumes from its checkpoint. The run
folder (weights, ignored by git) is deleted once the cell is recorded, unless --keep_runs.
"""
import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gan(disc_lr=None, steps=1, loss="quad", tokens="all", update="alternating"):
    """train.py flags of one discriminator setting; the defaults are the authors' (their lr: half the policy's,
    xavier init, no gradient clipping of the discriminators)."""
    lr = ["--disc_lr", f"{disc_lr:g}"] if disc_lr is not None else ["--disc_lr_ratio", "0.5"]
    return [*lr, "--disc_steps", str(steps), "--disc_loss", loss, "--disc_tokens", tokens, "--update", update,
            "--disc_init", "xavier", "--disc_max_grad_norm", "0"]


# train.py's policy lr is 5e-5, so the authors' discriminator lr is 2.5e-5; "dlr20x" = 20 times that.
# "-sim": the same setting with --update simultaneous, the order of the first grid (before the
# alternating update).
SETTINGS = {"ganpo": {},  # the authors' settings, spelled out
            "ganpo-frozen": {"disc_lr": 0},  # the policy trains against the random initial discriminators
            "ganpo-dlr20x": {"disc_lr": 5e-4}, "ganpo-dlr200x": {"disc_lr": 5e-3},
            "ganpo-dlr20x-k4": {"disc_lr": 5e-4, "steps": 4},
            "ganpo-dlr20x-ragan": {"disc_lr": 5e-4, "loss": "ragan"},
            "ganpo-dlr200x-ragan": {"disc_lr": 5e-3, "loss": "ragan"},
            "ganpo-dlr20x-ragan-k4": {"disc_lr": 5e-4, "steps": 4, "loss": "ragan"},
            "ganpo-dlr20x-resp": {"disc_lr": 5e-4, "tokens": "response"}}
METHODS = {"dpo": ["--adv_weight", "0"],
           **{name: gan(**kw) for name, kw in SETTINGS.items()},
           **{f"{name}-sim": gan(**kw, update="simultaneous") for name, kw in SETTINGS.items()},
           "ganpo-dlr20x-ragan-adv0.3": [*gan(disc_lr=5e-4, loss="ragan"), "--adv_weight", "0.3"],
           # the non-adversarial controls, a sweep of their weights first: DPO + λ_mmd·MMD² of the
           # latents, and DPO + α·NLL of the chosen responses (RPO)
           **{f"dpo-mmd{w:g}": ["--adv_weight", "0", "--latent_reg", "mmd", "--latent_weight", f"{w:g}"]
              for w in (10, 30, 100)},
           **{f"dpo-rpo{a:g}": ["--adv_weight", "0", "--rpo_alpha", f"{a:g}"] for a in (0.3, 1)},
           # the authors' settings with the authors' spectral-norm start (random u, v, no warm-up)
           "ganpo-snlegacy": [*gan(), "--disc_sn", "legacy"],
           "simpo": ["--loss", "simpo", "--beta", "2.0", "--gamma", "0.5", "--adv_weight", "0"],
           "ganpo-simpo": ["--loss", "simpo", "--beta", "2.0", "--gamma", "0.5"]}
# the comparison: DPO, the authors' settings, frozen discriminators, and the sweep's pick for each
# loss: four-term (quad) with lr 20x the authors' and 4 discriminator steps per policy step, and
# two-term (ragan) with lr 20x and 1 step (its discriminators already win at K = 1; see experiments/game.md);
# the four-term loss at 20x with K = 1, the first grid's one cell better than DPO; and the
# non-adversarial controls at their sweep's picks (λ_mmd = 10, α = 1; experiments/README.md)
COMPARISON = ["dpo", "ganpo", "ganpo-frozen", "ganpo-dlr20x", "ganpo-dlr20x-k4", "ganpo-dlr20x-ragan",
              "dpo-mmd10", "dpo-rpo1"]
OLD_GRID = "simultaneous-grid"  # the first grid's records (simultaneous update), in experiments/results/
# periodic held-out evaluations, so the discriminators' AUC can be followed over training
PERIODIC = ["--eval_every", "8", "--eval_pairs", "96"]
# float32 on every CPU, as every record was measured (--dtype auto picks bf16 on CPUs with bf16 units)
FP32 = ["--dtype", "fp32"]
SPLITS = ("test", "shift")


def cells(args):
    """Seed-major order, so a grid stopped early holds complete DPO/GANPO comparisons."""
    out = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for noise in [float(n) for n in args.noise.split(",")]:
            for method in args.methods.split(","):
                out.append({"name": f"{method}-n{noise:g}-s{seed}", "method": method, "noise": noise, "seed": seed})
    return out


def commands(cell, args, runs=None, python=sys.executable):
    """-> run folder, train command, eval command; they run in the repository root. With the defaults,
    as this machine runs them; with runs="runs/grid", python="python", as a record keeps them, so any
    clone can rerun a record's commands."""
    run = os.path.join(runs or args.runs, cell["name"])
    train = [python, "train.py", "--output_dir", run, *PERIODIC, *FP32, *METHODS[cell["method"]],
             "--label_noise", str(cell["noise"]), "--seed", str(cell["seed"]), *shlex.split(args.train_flags)]
    if runs is None and os.path.isfile(os.path.join(run, "checkpoint.pt")):
        train.append("--resume")
    evaluate = [python, "eval.py", run, "--split", ",".join(SPLITS), "--out", os.path.join(run, "eval.json"),
                "--plot", os.path.join(run, "eval.png"), *shlex.split(args.eval_flags)]
    return run, train, evaluate


def recorded_commands(cell, args):
    """-> train and eval commands as a record keeps them: default run folder, plain `python`."""
    _, train, evaluate = commands(cell, args, runs=os.path.join("runs", "grid"), python="python")
    return train, evaluate


def run_logged(cmd, log_path):
    """Run cmd with its output in log_path; -> wall seconds. A failure stops the grid with one line."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if rc != 0:
        sys.exit(f"error: `{shlex.join(cmd[1:3])} ...` failed (exit {rc}); see {log_path}")
    return time.time() - t0


def hardware():
    """The machine, named finely enough to tell whether two records' floats can agree: CPUs whose
    kernels differ (torch's AVX2 and AVX512 code paths) round differently, in the last bits."""
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    import torch
    return (f"{platform.machine()} {os.cpu_count()} cores, {model or platform.processor() or '?'}, torch "
            f"{torch.backends.cpu.get_cpu_capability()} kernels ({platform.platform()})")


def run_cell(cell, args):
    run, train, evaluate = commands(cell, args)
    if os.path.isdir(run) and not os.path.isfile(os.path.join(run, "checkpoint.pt")):
        shutil.rmtree(run)  # a run that never saved a checkpoint: start it again
    os.makedirs(args.runs, exist_ok=True)
    log = os.path.join(args.runs, cell["name"] + ".log")
    print(f"[{time.strftime('%H:%M:%S')}] {cell['name']}: training (log: {log})", flush=True)
    train_s = run_logged(train, log)
    with open(os.path.join(run, "run_config.json")) as f:
        max_steps = json.load(f)["max_steps"]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    steps = [m for m in metrics if "split" not in m]
    evals = [m for m in metrics if "split" in m]  # periodic and final held-out evaluations
    final = {m["split"]: m for m in evals if m["step"] == max_steps}
    if not final:  # train.py saves and exits cleanly when stopped by a signal: never score a half-trained policy
        sys.exit(f"error: {cell['name']}: training stopped before step {max_steps}; rerun the grid to resume it")
    print(f"[{time.strftime('%H:%M:%S')}] {cell['name']}: evaluating", flush=True)
    eval_s = run_logged(evaluate, log)
    with open(os.path.join(run, "eval.json")) as f:
        ev = json.load(f)["results"][0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    train_as_recorded, evaluate_as_recorded = recorded_commands(cell, args)
    record = {**cell, "commit": commit, "train_command": shlex.join(train_as_recorded),
              "eval_command": shlex.join(evaluate_as_recorded),
              "hardware": hardware(),
              "train_wall_s": train_s, "eval_wall_s": eval_s,
              "step_time_median_s": statistics.median(m["step_time"] for m in steps),
              "peak_memory_gib": max(m.get("memory/peak_gib", 0) for m in steps),
              "final_eval": {s: {k[5:]: v for k, v in m.items() if k.startswith("eval/")} for s, m in final.items()},
              "eval": ev["splits"], "train_config": {**ev["train_config"], "output_dir": train_as_recorded[3]},
              "metrics": steps, "evals": evals}
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, cell["name"] + ".json")
    sys.path.insert(0, ROOT)
    import loading  # here, not at the top: --report and --compare need no torch
    loading.write_text(path, json.dumps(record, indent=1))  # the cell counts as done only now
    if not args.keep_runs:
        shutil.rmtree(run)
    print(f"[{time.strftime('%H:%M:%S')}] {cell['name']}: done in {train_s + eval_s:.0f} s "
          f"(train {train_s:.0f} s, eval {eval_s:.0f} s) -> {path}", flush=True)


# ---------------------------------------------------------------------------------------- compare

# what may differ between two runs of the same cell: where and when it ran, and how long it took
CIRCUMSTANCES = {"commit", "train_command", "eval_command", "hardware", "train_wall_s", "eval_wall_s",
                 "step_time_median_s", "peak_memory_gib", "resume", "output_dir", "step_time", "tokens_per_s",
                 "memory/peak_gib"}


def differences(a, b, path=""):
    """(path, a, b) for every figure that differs between two records of a cell."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) if k not in CIRCUMSTANCES
                for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def load_records(folder):
    """{file name: record} of the finished cells in `folder` (none if it does not exist), by name."""
    records = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            path = os.path.join(folder, name)
            try:
                with open(path) as f:
                    records[name] = json.load(f)
            except json.JSONDecodeError as e:
                sys.exit(f"error: {path}: not a cell record ({e})")
    return records


def relative(x, y):
    """|x − y| relative to the larger of the two; inf where either is not a number (a text, a
    missing figure)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
        return math.inf
    return abs(x - y) / max(abs(x), abs(y), 1e-300)


def compare(args):
    """Every cell in --compare that --results also holds: are all its figures equal?"""
    mine, theirs = load_records(args.results), load_records(args.compare)
    names = sorted(set(mine) & set(theirs))
    if not names:
        sys.exit(f"error: --compare {args.compare}: no finished cell that {args.results} also holds")
    bad = 0
    for name in names:
        diffs = sorted(differences(mine[name], theirs[name]), key=lambda d: -relative(d[1], d[2]))
        print(f"{name[:-5]}: " + ("every figure equal" if not diffs else f"{len(diffs)} figures differ, "
                                  f"the largest relative difference {relative(*diffs[0][1:]):.1e} first"))
        for path, x, y in diffs[:10]:
            print(f"  {path}: {repr(x)[:80]} vs {repr(y)[:80]}")
        bad += bool(diffs)
    if bad:
        sys.exit(f"error: {bad} of {len(names)} cells in {args.compare} differ from {args.results}")


# ---------------------------------------------------------------------------------------- report

def key(r):
    """A cell's place in the grid: (method, noise, seed)."""
    return r["method"], r["noise"], r["seed"]


def what_reward_follows(done):
    """Across the comparison's cells of one noise level (every method and seed), the Pearson
    correlation of eval.py's reward on `test` with two distances from the reference: the sampled
    KL of the policy's outputs and the MMD² of its latents, at each temperature."""
    lines = ["", "What the reward follows: across the comparison's cells of one noise level, every "
             "method and seed, `test` split, the Pearson correlation of eval.py's reward with its sampled KL "
             "to the reference and with the latent MMD² to the reference.", "",
             "| noise | cells | T | r(reward, KL) | r(reward, MMD²) |", "|---|---|---|---|---|"]
    rows = []
    for noise in (0.0, 0.2):
        tests = [on_test(r) for r in done if r["method"] in COMPARISON and r["noise"] == noise]
        for t in temperatures_on_test(tests):
            cells = [(e["generation"][t]["reward"], e["generation"][t]["kl"], e["latent/mmd2"])
                     for e in tests if t in e["generation"]]
            if len(cells) >= 3:
                reward, kl, mmd2 = zip(*cells)
                rows.append(f"| {noise:g} | {len(cells)} | {t} | {statistics.correlation(reward, kl):.2f} | "
                            f"{statistics.correlation(reward, mmd2):.2f} |")
    return lines + rows if rows else []


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def acc_se(e, n):
    """Binomial standard error of a preference accuracy measured on n pairs."""
    p = e["rewards/accuracies"]
    return math.sqrt(p * (1 - p) / n)


def final_pairs(r, split):
    """Pairs in train.py's final evaluation of `split`: recorded since the alternating update; before, every row
    of the bundled split (the grid's max_length drops none)."""
    if "pairs" in r["final_eval"][split]:
        return r["final_eval"][split]["pairs"]
    with open(os.path.join(ROOT, "data", f"{split}.jsonl")) as f:
        return sum(1 for line in f if line.strip())


def with_se(value, se, effect=False):
    """'value ± se'; effect=True (a difference): starred when |value| > 2·se, our bar for an effect."""
    if value is None:
        return "-"
    if se is None:
        return f"{value:.3f}"
    return f"{value:.3f} ± {se:.3f}" + ("*" if effect and abs(value) > 2 * se else "")


def on_test(r):
    return r["eval"]["test"]


# a record's `test` figures for the cell-by-cell tables, each -> (value, its standard error or None)
TEST_FIGURES = {"auc": lambda r: (on_test(r).get("disc/auc_real_fake"), None),
                "mmd2": lambda r: (on_test(r)["latent/mmd2"], None),
                "cosine": lambda r: (on_test(r)["latent/cosine"], None),
                "acc": lambda r: (r["final_eval"]["test"]["rewards/accuracies"],
                                  acc_se(r["final_eval"]["test"], final_pairs(r, "test")))}


def temperatures_on_test(tests):
    """The sampling temperatures any of these `test` evaluations holds, in order (keys as eval.py
    records them: "0.7", "1.0", "1.5")."""
    return sorted({t for e in tests for t in e["generation"]}, key=float)


def reward_on_test(t):
    """-> getter of the reward at temperature t (a string key, as eval.py records it) ± its standard error."""
    return lambda r: (on_test(r)["generation"][t]["reward"], on_test(r)["generation"][t].get("reward_se"))


def figure(r, get):
    """One table entry: get(r) as 'value ± se', '-' where the record lacks the figure."""
    try:
        return with_se(*get(r))
    except (KeyError, TypeError):
        return "-"


def report(args):
    done = list(load_records(args.results).values())
    if not done:
        sys.exit(f"error: no finished cells in {args.results}")
    t = args.temperature
    groups = {}
    for r in done:
        groups.setdefault((r["method"], r["noise"]), []).append(r)
    lines = [f"Cells: {len(done)} ({', '.join(sorted(r['name'] for r in done))}). Mean ± sd over seeds (n = seeds).",
             f"Generation metrics at T = {t}; latent drift = MMD² between policy and reference last-layer states.", "",
             "| method | noise | split | n | pref. acc | reward | win rate vs ref | KL | MMD² | degenerate | distinct-2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (method, noise), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for split in SPLITS:
            ev = [r["eval"][split] for r in rs if split in r["eval"]]
            gen = [e["generation"].get(str(t)) or {} for e in ev]
            cols = [mean_sd([e["rewards/accuracies"] for e in ev]), mean_sd([g.get("reward") for g in gen]),
                    mean_sd([g.get("win_rate") for g in gen]), mean_sd([g.get("kl") for g in gen]),
                    mean_sd([e["latent/mmd2"] for e in ev]), mean_sd([g.get("degenerate") for g in gen]),
                    mean_sd([g.get("distinct_2") for g in gen])]
            lines.append(f"| {method} | {noise:g} | {split} | {len(ev)} | " + " | ".join(cols) + " |")
    lines += game_table(groups)
    lines += comparison_table(groups)
    lines += per_seed_table(done)
    lines += against_dpo(done)
    lines += paired(done, t)
    lines += controls_sweep(done)
    lines += what_reward_follows(done)
    lines += old_vs_new(done, load_records(os.path.join(args.results, OLD_GRID)).values())
    lines += ["", "| method | cells | median s/step | peak memory GiB | train wall s | eval wall s |", "|---|---|---|---|---|---|"]
    by_method = {}
    for r in done:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in sorted(by_method.items()):
        lines.append(f"| {method} | {len(rs)} | {mean_sd([r['step_time_median_s'] for r in rs])} | "
                     f"{mean_sd([r['peak_memory_gib'] for r in rs])} | {mean_sd([r['train_wall_s'] for r in rs])} | "
                     f"{mean_sd([r['eval_wall_s'] for r in rs])} |")
    lines += ["", f"Commits: {', '.join(sorted({r['commit'] for r in done}))}; hardware: {done[0]['hardware']}."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.results, "..", "results.md"), "w") as f:
        f.write(text)
    print(text)
    plot(done, groups, os.path.join(args.results, "..", "results.png"), t)
    plot_game(done, os.path.join(args.results, "..", "game.png"))
    plot_comparison(done, os.path.join(args.results, "..", "comparison.png"))


def weight_change(step_metrics):
    """Both discriminators' relative weight change from their initial weights at one step, averaged
    (None: no discriminators, or a record from before it was logged)."""
    m = step_metrics
    return (m["disc/chosen/weight_change"] + m["disc/rejected/weight_change"]) / 2 if "disc/chosen/weight_change" in m else None


def pyplot():
    """matplotlib.pyplot, drawing to files only (no window)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def game_table(groups):
    """The discriminators' own view of held-out pairs beside the independent drift measures."""
    lines = ["", "The discriminator game at the end of training (eval.py on 100 held-out pairs per split). "
             "D AUC: the trained discriminators' held-out AUC, reference over policy latents of their polarity "
             "(ref > policy) and policy latents over the reference's of the other polarity (policy > other); "
             "0.5 = chance, '-' = no discriminators or a record from before they were measured. Weight change: "
             "‖θ_D − θ_D,0‖ / ‖θ_D,0‖. Then the independent drift measures (no discriminator involved): MMD² and "
             "cosine to the reference's latents, and a fresh linear probe's accuracy (0.5 = indistinguishable).", "",
             "| method | noise | split | n | D AUC ref > policy | D AUC policy > other | D weight change | MMD² | cosine | probe | pref. acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (method, noise), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for split in SPLITS:
            ev = [r["eval"][split] for r in rs if split in r["eval"]]
            cols = [mean_sd([e.get("disc/auc_real_fake") for e in ev]), mean_sd([e.get("disc/auc_fake_contrast") for e in ev]),
                    mean_sd([weight_change(r["metrics"][-1]) for r in rs]), mean_sd([e["latent/mmd2"] for e in ev]),
                    mean_sd([e["latent/cosine"] for e in ev]), mean_sd([e["latent/probe_accuracy"] for e in ev]),
                    mean_sd([e["rewards/accuracies"] for e in ev])]
            lines.append(f"| {method} | {noise:g} | {split} | {len(ev)} | " + " | ".join(cols) + " |")
    return lines


def comparison_table(groups):
    """The comparison's methods at each noise level: the discriminators' view, drift, accuracy, and
    reward at every temperature, mean ± sd over seeds."""
    temps = sorted({t for rs in groups.values() for r in rs for s in SPLITS for t in r["eval"][s]["generation"]}, key=float)
    lines = ["", "The comparison, with the non-adversarial controls: " + ", ".join(COMPARISON)
             + "; eval.py on 100 held-out pairs per split, "
             "mean ± sd over seeds.", "",
             "| method | noise | split | n | D AUC ref > policy | MMD² | cosine | probe | pref. acc | "
             + " | ".join(f"reward T={t}" for t in temps) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(temps)]
    for (method, noise), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], COMPARISON.index(kv[0][0])
                                                                          if kv[0][0] in COMPARISON else 99)):
        if method not in COMPARISON or noise not in (0.0, 0.2):
            continue
        for split in SPLITS:
            ev = [r["eval"][split] for r in rs]
            cols = [mean_sd([e.get("disc/auc_real_fake") for e in ev]), mean_sd([e["latent/mmd2"] for e in ev]),
                    mean_sd([e["latent/cosine"] for e in ev]), mean_sd([e["latent/probe_accuracy"] for e in ev]),
                    mean_sd([e["rewards/accuracies"] for e in ev])]
            cols += [mean_sd([e["generation"].get(t, {}).get("reward") for e in ev]) for t in temps]
            lines.append(f"| {method} | {noise:g} | {split} | {len(ev)} | " + " | ".join(cols) + " |")
    return lines


def per_seed_table(done):
    """The comparison cell by cell on `test`, each seed beside DPO's of the same seed (same pairs, same
    order), accuracy and reward ± their standard errors."""
    by_key = {key(r): r for r in done}
    seeds = sorted({r["seed"] for r in done if r["method"] in COMPARISON})
    temps = temperatures_on_test(on_test(r) for r in done if r["method"] in COMPARISON)
    lines = ["", "The comparison seed by seed (" + " / ".join(f"seed {s}" for s in seeds) + "), `test` split: D AUC, "
             "MMD², cosine and reward from eval.py (100 pairs; reward: 12 prompts x 2 samples, ± its standard error "
             "over prompts where recorded), preference accuracy from train.py's final evaluation (all 276 pairs, ± its "
             "binomial standard error). '?': not run yet.", "",
             "| method | noise | D AUC ref > policy | MMD² to ref | cosine | pref. acc | "
             + " | ".join(f"reward T={t}" for t in temps) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(temps)]
    getters = [TEST_FIGURES[f] for f in ("auc", "mmd2", "cosine", "acc")] + [reward_on_test(t) for t in temps]
    for noise in (0.0, 0.2):
        if not any((method, noise, s) in by_key for method in COMPARISON for s in seeds):
            continue
        for method in COMPARISON:
            cols = [" / ".join("?" if (method, noise, s) not in by_key else figure(by_key[(method, noise, s)], get)
                               for s in seeds) for get in getters]
            lines.append(f"| {method} | {noise:g} | " + " | ".join(cols) + " |")
    return lines


def mean_difference(pairs, get):
    """Mean over seeds of get(cell) − get(its base's cell), get -> (value, its standard error or None),
    ± the mean's standard error from sampling (the two cells taken as independent, so it errs wide):
    'Δ ± se', starred past 2 standard errors; no se where a record lacks one."""
    got = [(get(b), get(g)) for b, g in pairs]
    ses = [x[1] for pair in got for x in pair]
    se = math.sqrt(sum(v ** 2 for v in ses)) / len(got) if None not in ses else None
    return with_se(statistics.mean(g[0] - b[0] for b, g in got), se, effect=True)


def against_dpo(done):
    """Each comparison method minus DPO on `test`, same seed and noise, averaged over the seeds both
    ran: accuracy over train.py's final evaluation and reward at each temperature, ± standard errors."""
    by_key = {key(r): r for r in done}
    temps = temperatures_on_test(on_test(r) for r in done if r["method"] in COMPARISON)
    lines = ["", "Against DPO, seeds pooled: each method minus DPO on the same seed and noise, `test` split, averaged "
             "over the seeds both ran; ± the standard error of that mean from sampling (the cells taken as "
             "independent: accuracy binomial over train.py's final evaluation's pairs, reward over eval.py's "
             "prompts; none where a record lacks it), * where |Δ| > 2 standard errors. Δ MMD²: seed by seed.", "",
             "| method − dpo | noise | seeds | Δ MMD² to ref | Δ pref. acc | "
             + " | ".join(f"Δ reward T={t}" for t in temps) + " |", "|---|---|---|---|---|" + "---|" * len(temps)]
    getters = [TEST_FIGURES["acc"]] + [reward_on_test(t) for t in temps]
    rows = []
    for noise in (0.0, 0.2):
        for method in COMPARISON[1:]:
            seeds = sorted(k[2] for k in by_key if k[:2] == (method, noise) and ("dpo", noise, k[2]) in by_key)
            pairs = [(by_key[("dpo", noise, s)], by_key[(method, noise, s)]) for s in seeds]
            if pairs:
                mmd2 = " / ".join(f"{on_test(g)['latent/mmd2'] - on_test(b)['latent/mmd2']:+.3f}" for b, g in pairs)
                rows.append(f"| {method} − dpo | {noise:g} | {', '.join(map(str, seeds))} | {mmd2} | "
                            + " | ".join(mean_difference(pairs, get) for get in getters) + " |")
    return lines + rows if rows else []


def old_vs_new(done, old):
    """Each rerun cell beside its record from the first grid (simultaneous update, PyTorch's
    initialisation, discriminator gradients clipped at 1), on `test`."""
    old = {key(r): r for r in old}
    rows = [(r, old[key(r)]) for r in sorted(done, key=key) if key(r) in old]
    if not rows:
        return []
    lines = ["", f"Old -> new: each rerun cell's record in {OLD_GRID}/ (the first grid) and now, `test` split; "
             "accuracy from train.py's final evaluation (276 pairs, ± its binomial standard error), the rest "
             "from eval.py (reward ± its standard error over prompts, recorded since the alternating update).", "",
             "| cell | D AUC ref > policy | MMD² to ref | pref. acc | reward T=1.0 | reward T=1.5 |", "|---|---|---|---|---|---|"]
    getters = [TEST_FIGURES[f] for f in ("auc", "mmd2", "acc")] + [reward_on_test(t) for t in ("1.0", "1.5")]
    for new, was in rows:
        cols = [f"{figure(was, g)} -> {figure(new, g)}" for g in getters]
        lines.append(f"| {new['name']} | " + " | ".join(cols) + " |")
    return lines


CONTROLS = [m for m in METHODS if m.startswith(("dpo-mmd", "dpo-rpo"))]  # the controls' sweep


def penalty(r):
    """(base loss, its weighted control term) averaged over a cell's training steps: the term is
    λ_mmd·latent/mmd or α·nll/chosen, whichever the cell trained with (0 for plain DPO)."""
    c, steps = r["train_config"], r["metrics"]
    weight, name = ((c["latent_weight"], "latent/mmd") if c.get("latent_reg") == "mmd"
                    else (c.get("rpo_alpha", 0.0), "nll/chosen"))
    return (statistics.mean(m["opo/loss"] for m in steps),
            statistics.mean(weight * m[name] for m in steps) if weight else 0.0)


def controls_sweep(done):
    """The controls' sweep on the default run (noise 0, seed 0): DPO beside each weight of the two
    non-adversarial controls; the term's size next to the DPO loss as trained, then eval.py's
    independent MMD², the held-out accuracy and the reward."""
    by_key = {key(r): r for r in done}
    rows = [by_key[(m, 0.0, 0)] for m in ["dpo", *CONTROLS] if (m, 0.0, 0) in by_key]
    if len(rows) < 2:
        return []
    temps = temperatures_on_test(on_test(r) for r in rows)
    lines = ["", "The non-adversarial controls' sweep, label noise 0, seed 0, `test` split: the DPO "
             "loss and the weighted control term (λ_mmd·MMD² of the batch latents, or α·NLL of the chosen "
             "responses), each averaged over the cell's training steps; then eval.py's MMD² to the reference "
             "(its own pairs, bandwidth and estimate), train.py's final accuracy (± binomial SE over its pairs) "
             "and reward (± SE).", "",
             "| method | DPO loss | control term | MMD² to ref | pref. acc | "
             + " | ".join(f"reward T={t}" for t in temps) + " |", "|---|---|---|---|---|" + "---|" * len(temps)]
    getters = [TEST_FIGURES["mmd2"], TEST_FIGURES["acc"]] + [reward_on_test(t) for t in temps]
    for r in rows:
        base, term = penalty(r)
        lines.append(f"| {r['method']} | {base:.3f} | {term:.3f} | "
                     + " | ".join(figure(r, g) for g in getters) + " |")
    return lines


def plot_comparison(done, path):
    """One row per noise level: held-out AUC over training, latent MMD², reward against temperature;
    each method's mean over its seeds (thin lines: each seed)."""
    plt = pyplot()
    rows = [n for n in (0.0, 0.2) if any(r["noise"] == n and r["method"] in COMPARISON for r in done)]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 3, figsize=(16, 4.4 * len(rows)), squeeze=False)
    color = {m: plt.cm.tab10(i) for i, m in enumerate(COMPARISON)}
    for row, noise in zip(axes, rows):
        for x, method in enumerate(COMPARISON):
            cells = rs = [r for r in done if r["method"] == method and r["noise"] == noise]
            if not cells:
                continue

            def label(n):
                return f"{method} ({n} seed{'s' if n > 1 else ''})"
            curves = [[(0, 0.5)] + [(e["step"], e["eval/disc/auc_real_fake"]) for e in r.get("evals", [])
                                    if e["split"] == "test" and "eval/disc/auc_real_fake" in e] for r in rs]
            curves = [c for c in curves if len(c) > 1]
            for c in curves:
                row[0].plot(*zip(*c), color=color[method], lw=0.6, alpha=0.5)
            if curves and all(len(c) == len(curves[0]) for c in curves):
                row[0].plot([p[0] for p in curves[0]], [statistics.mean(c[i][1] for c in curves) for i in range(len(curves[0]))],
                            color=color[method], lw=2, marker="o", ms=3, label=label(len(curves)))
            for j, (split, dx) in enumerate((("test", -0.18), ("shift", 0.18))):
                values = [r["eval"][split]["latent/mmd2"] for r in cells]
                row[1].bar(x + dx, statistics.mean(values), width=0.34, color=color[method], alpha=1.0 if j == 0 else 0.5)
                row[1].scatter([x + dx] * len(values), values, color="black", s=8, zorder=3)
            for split, style in (("test", "-"), ("shift", "--")):
                temps = sorted(cells[0]["eval"][split]["generation"], key=float)  # "0.7", "1.0", "1.5"
                row[2].plot([float(t) for t in temps], [statistics.mean(r["eval"][split]["generation"][t]["reward"] for r in cells)
                                                        for t in temps],
                            color=color[method], linestyle=style, marker="o", ms=3, label=label(len(cells)) if split == "test" else None)
        row[0].axhline(0.5, color="gray", lw=0.8)
        row[0].set(xlabel="policy step", ylabel="held-out AUC, reference > policy (test)", ylim=(-0.02, 1.02),
                   title=f"label noise {noise:g}: the discriminators' view")
        if row[0].get_legend_handles_labels()[0]:
            row[0].legend(fontsize=7)
        row[1].set_xticks(range(len(COMPARISON)), COMPARISON, rotation=25, fontsize=7)
        row[1].set(ylabel="latent MMD² to the reference", title=f"label noise {noise:g}: drift (dark: test, light: shift; dots: seeds)")
        row[2].set(xlabel="sampling temperature", ylabel="VADER reward", title=f"label noise {noise:g}: reward (solid: test, dashed: shift)")
        row[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {os.path.normpath(path)}")


def palette(plt, methods):
    """One distinct colour per method (tab20 holds 20); game.png and results.png both draw every
    recorded method, so a method has the same colour in both (comparison.png keeps its own eight)."""
    return {m: plt.cm.tab20(i % 20) for i, m in enumerate(sorted(methods))}


def plot_game(done, path):
    """Held-out discriminator AUC and weight change over training, and where each run's latents ended up."""
    plt = pyplot()
    color = palette(plt, {r["method"] for r in done})
    style = {0.0: "-", 0.2: "--", 0.4: ":"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    labelled, scattered = set(), set()
    for r in sorted(done, key=key):
        label = r["method"] if r["method"] not in labelled else None
        evals = [e for e in r.get("evals", []) if e["split"] == "test" and "eval/disc/auc_real_fake" in e]
        if evals:
            labelled.add(r["method"])
            axes[0].plot([0] + [e["step"] for e in evals], [0.5] + [e["eval/disc/auc_real_fake"] for e in evals],
                         color=color[r["method"]], linestyle=style.get(r["noise"], "-"), marker="o", ms=3, label=label)
            axes[1].plot([m["step"] + 1 for m in r["metrics"]], [weight_change(m) for m in r["metrics"]], color=color[r["method"]], linestyle=style.get(r["noise"], "-"))
        auc_end = r["eval"]["test"].get("disc/auc_real_fake", 0.5 if r["train_config"]["adv_weight"] == 0 else None)
        if auc_end is None:  # a GANPO record from before the discriminators were measured
            continue
        axes[2].scatter(auc_end, r["eval"]["test"]["latent/mmd2"], color=color[r["method"]],
                        marker={0.0: "o", 0.2: "s", 0.4: "^"}.get(r["noise"], "x"), s=40,
                        label=r["method"] if r["method"] not in scattered else None)
        scattered.add(r["method"])
    axes[0].axhline(0.5, color="gray", lw=0.8)
    axes[0].set(xlabel="policy step", ylabel="held-out AUC, reference > policy",
                title="discriminators' held-out view (test; -- noise 0.2)")
    axes[1].set(xlabel="policy step", ylabel="‖θ_D − θ_D,0‖ / ‖θ_D,0‖", title="discriminator weight change")
    axes[1].set_yscale("symlog", linthresh=1e-4)  # symlog: frozen discriminators sit at exactly 0
    axes[1].set_yticks([0, 1e-4, 1e-3, 1e-2, 1e-1])
    axes[2].set(xlabel="final held-out AUC, reference > policy (DPO, no D: 0.5)", ylabel="latent MMD² to the reference (test)",
                title="end of training (o noise 0, s 0.2, ^ 0.4)")
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside, not over, the panel
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {os.path.normpath(path)}")


# (base loss, the same loss + the adversarial term)
PAIRS = [("dpo", m) for m in METHODS if m.startswith(("ganpo", "dpo-")) and m != "ganpo-simpo"] + [("simpo", "ganpo-simpo")]


def paired(done, t):
    """GANPO minus its base loss on the same seed and noise (same pairs, same order), averaged over
    seeds. Accuracy and reward: ± the standard error of the difference from sampling (the two cells
    taken as independent, so it errs wide), starred where it exceeds 2 standard errors; the other
    columns: ± sd over seeds, the spread of the differences."""
    by_key = {key(r): r for r in done}
    lines = ["", f"Paired differences, (method with the adversarial term) − (its base loss), same seed and noise; "
             f"generation at T = {t}; accuracy on eval.py's 100 pairs. Δ acc and Δ reward: ± the standard error of "
             "the difference (sampling, the two cells taken as independent); * where |Δ| > 2 standard errors. Other "
             "columns: ± sd over seeds. Time and memory are ratios.", "",
             "| pair | noise | split | n | Δ pref. acc | Δ reward | Δ win rate | Δ KL | Δ MMD² | s/step ratio | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = 0
    for base, gan in PAIRS:
        for noise in sorted({k[1] for k in by_key}):
            seeds = sorted(k[2] for k in by_key if k[0] == gan and k[1] == noise and (base, noise, k[2]) in by_key)
            if not seeds:
                continue
            pairs = [(by_key[(base, noise, s)], by_key[(gan, noise, s)]) for s in seeds]
            ratio = [mean_sd([g[k] / b[k] for b, g in pairs]) for k in ("step_time_median_s", "peak_memory_gib")]
            for split in SPLITS:
                def delta(get):
                    return mean_sd([get(g["eval"][split]) - get(b["eval"][split]) for b, g in pairs])

                def gen(key):
                    return lambda e: e["generation"][str(t)][key]
                def sampled(get, se):  # the mean difference over seeds ± its standard error
                    return mean_difference(pairs, lambda r: (get(r["eval"][split]), se(r["eval"][split])))

                cols = [sampled(lambda e: e["rewards/accuracies"], lambda e: acc_se(e, e["pairs"])),
                        sampled(gen("reward"), lambda e: e["generation"][str(t)].get("reward_se")),
                        delta(gen("win_rate")),
                        delta(gen("kl")), delta(lambda e: e["latent/mmd2"])]
                lines.append(f"| {gan} − {base} | {noise:g} | {split} | {len(seeds)} | " + " | ".join(cols)
                             + f" | {ratio[0]} | {ratio[1]} |")
                rows += 1
    return lines if rows else []


def plot(done, groups, path, t):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = palette(plt, {r["method"] for r in done})
    markers = {0.0: "o", 0.2: "s", 0.4: "^"}
    for r in done:
        for split, fill in (("test", True), ("shift", False)):
            g = r["eval"][split]["generation"].get(str(t))
            if g:
                c = colors[r["method"]]
                axes[0].scatter(g["kl"], g["reward"], color=c if fill else "none", edgecolors=c,
                                marker=markers.get(r["noise"], "x"), s=45)
    axes[0].set(xlabel=f"KL estimate (T = {t})", ylabel="VADER reward", title="reward vs KL (filled: test, open: shift)")
    for ax, split in zip(axes[1:], SPLITS):
        for (method, noise), rs in sorted(groups.items()):
            temps = sorted({float(k) for r in rs for k in r["eval"][split]["generation"]})
            means = [statistics.mean(r["eval"][split]["generation"][str(x)]["reward"] for r in rs) for x in temps]
            ax.plot(temps, means, color=colors[method], marker=markers.get(noise, "x"),
                    linestyle={0.0: "-", 0.2: "--", 0.4: ":"}.get(noise, "-"), label=f"{method}, noise {noise:g}")
        ax.set(xlabel="sampling temperature", ylabel="VADER reward", title=f"reward vs temperature ({split})")
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside, not over, the panel
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {os.path.normpath(path)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="dpo,ganpo", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--noise", default="0,0.2,0.4", help="label-noise levels (train.py --label_noise)")
    p.add_argument("--seeds", default="0,1", help="seeds (train.py --seed)")
    p.add_argument("--only", default="", help="run just these cells (comma list of names)")
    p.add_argument("--train_flags", default="", help="extra train.py flags for every cell (e.g. for a smoke test)")
    p.add_argument("--eval_flags", default="", help="extra eval.py flags for every cell")
    p.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"), help="one JSON per finished cell")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "grid"), help="run folders and logs (not committed)")
    p.add_argument("--keep_runs", action="store_true", help="keep each cell's weights after it is recorded")
    p.add_argument("--temperature", type=float, default=1.0, help="--report: temperature of the table's generation columns")
    p.add_argument("--dry_run", action="store_true", help="list the cells and their commands, run nothing")
    p.add_argument("--report", action="store_true", help="write results.md and results.png from finished cells")
    p.add_argument("--compare", default="", help="a second results folder: check its cells' figures equal --results'")
    args = p.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        sys.exit(f"error: --methods {','.join(unknown)}: expected some of {', '.join(METHODS)}")
    if args.report:
        return report(args)
    if args.compare:
        return compare(args)
    todo = cells(args)
    if args.only:
        names = set(args.only.split(","))
        missing = names - {c["name"] for c in todo}
        if missing:
            sys.exit(f"error: --only {','.join(sorted(missing))}: no such cell (see --dry_run)")
        todo = [c for c in todo if c["name"] in names]
    for cell in todo:
        done = os.path.isfile(os.path.join(args.results, cell["name"] + ".json"))
        if args.dry_run:
            train, evaluate = recorded_commands(cell, args)
            print(f"{cell['name']}{' (done)' if done else ''}\n  {shlex.join(train)}\n  {shlex.join(evaluate)}")
        elif not done:
            run_cell(cell, args)


if __name__ == "__main__":
    main()
