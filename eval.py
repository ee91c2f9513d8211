"""Measure what GANPO changes: held-out preferences, latent drift, and generations under noise
and shift.

    python eval.py                               # the default run (out/ganpo-smollm2), test + shift
    python eval.py out/dpo out/ganpo --limit 32  # runs side by side
    python eval.py --help

For each run folder (a train.py output) the reference is rebuilt from the run's --model, exactly
as train.py built it. Per split it reports
  - preferences: the TRL-named metrics from ganpo.evaluate, the function train.py evaluates with;
  - latent drift: policy vs reference mean-pooled last-layer states on the held-out sequences
    (cosine similarity, RBF-kernel MMD², and a fresh linear probe's held-out accuracy; the trained
    discriminators are never used, since they are part of what is judged);
  - the discriminators' view, kept apart from the drift measures (runs whose checkpoint holds
    discriminators): the trained discriminators' held-out AUC of reference over policy latents,
    and of policy latents over the reference's of the other polarity;
  - generations at each temperature: reward, win rate against the reference's samples, length,
    distinct-2, share of degenerate (looping) samples, and a sampled estimate of the KL between
    the policy and the reference, both tempered to T (the two distributions sampled at T).
"""
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser

import ganpo
import loading
import scaleout
from ganpo import option
from loading import fail

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # evaluation runs in float32 throughout
START = time.time()


def progress(message):
    print(f"[{time.time() - START:6.0f} s] {message}", flush=True)


@dataclass
class EvalConfig:
    runs: list[str] = field(default_factory=lambda: ["out/ganpo-smollm2"],
                            metadata={"help": "run folders (train.py --output_dir)"})
    data: str = option("", "held-out data (default: the run's --data)")
    split: str = option("test,shift", "comma list of splits (bundled: test, shift)")
    limit: int = option(100, "first N pairs (and at most N prompts) per split (0 = all)")
    gen_prompts: int = option(12, "prompts per split for generation")
    temperatures: str = option("0.7,1.0,1.5", "sampling temperatures (high = the paper's noise)")
    samples: int = option(2, "samples per prompt, model and temperature")
    max_new_tokens: int = option(48, "length cap of each sample")
    reward_model: str = option("", "HF sequence-classification reward model (default: VADER)")
    batch_size: int = option(8, "pairs per forward for preferences")
    seed: int = option(0, "seeds sampling and the probe")
    out: str = option("", "JSON path (default: RUN/eval.json for one run, eval.json for several)")
    plot: str = option("", "PNG path (default: next to --out)")
    curves: bool = option(False, "only draw RUN/curves.png, the training curves from "
                                 "RUN/metrics.jsonl (seconds; no model is loaded)")


# ---------------------------------------------------------------------------------- latent drift

def rbf_mmd2(x, y):
    """MMD² between samples x (n, d) and y (m, d): RBF kernel, median-distance bandwidth, biased
    (V-statistic) estimate, so it is ≥ 0 and exactly 0 when the two sets coincide."""
    z = torch.cat([x, y]).double()
    d2 = torch.cdist(z, z).pow(2)
    bandwidth = d2[d2 > 0].median() if (d2 > 0).any() else torch.tensor(1.0, dtype=torch.float64)
    k = torch.exp(-d2 / bandwidth)
    n = len(x)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def probe_accuracy(policy_latents, ref_latents, seed, steps=300):
    """Held-out accuracy of a fresh logistic-regression probe telling policy from reference latents.

    Sequences are split in halves (both latents of a sequence on the same side, so nothing leaks);
    0.5 = indistinguishable, 1.0 = perfectly separable."""
    n = len(policy_latents)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = perm[: n // 2], perm[n // 2:]

    def xy(idx):
        return (torch.cat([policy_latents[idx], ref_latents[idx]]).double(),
                torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))]).double())
    x_train, y_train = xy(train_idx)
    x_test, y_test = xy(test_idx)
    mu, sd = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(x_train.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(x_train @ w + b, y_train)
                + 1e-3 * w.pow(2).sum())
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        logits = x_test @ w + b
    # a tie (identical latents) is a coin flip: count it as half right
    correct = torch.where(logits == 0, 0.5, ((logits > 0).double() == y_test).double())
    return float(correct.mean())


def latent_drift(latents, seed):
    p, r = latents["policy"], latents["ref"]
    return {"latent/cosine": float(torch.nn.functional.cosine_similarity(p, r, dim=-1).mean()),
            "latent/mmd2": rbf_mmd2(p, r), "latent/probe_accuracy": probe_accuracy(p, r, seed)}


# ----------------------------------------------------------------------------------- generations

def distinct_2(texts):
    bigrams = [tuple(t.split()[i:i + 2]) for t in texts for i in range(max(len(t.split()) - 1, 0))]
    return len(set(bigrams)) / max(len(bigrams), 1)


def is_degenerate(text, n=3, repeats=3):
    """A sample loops if some word n-gram occurs at least `repeats` times."""
    words = text.split()
    counts = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        counts[g] = counts.get(g, 0) + 1
    return any(c >= repeats for c in counts.values())


def make_scorer(reward_model):
    """texts -> rewards: VADER compound sentiment (the bundled task's ground truth) or a HF reward
    model."""
    if not reward_model:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        analyzer = SentimentIntensityAnalyzer()
        return lambda prompts, texts: [analyzer.polarity_scores(t)["compound"] for t in texts]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(reward_model)
        rm = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    except (OSError, ValueError) as e:
        fail(f"--reward_model {reward_model}: cannot load it ({type(e).__name__})")

    @torch.no_grad()
    def score(prompts, texts):
        convs = [p + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
        enc = [tok.apply_chat_template(c, tokenize=False) if tok.chat_template
               else c[-2]["content"] + "\n" + t for c, t in zip(convs, texts)]
        out = []
        for i in range(0, len(enc), 8):
            batch = tok(enc[i:i + 8], return_tensors="pt", padding=True, truncation=True,
                        max_length=1024)
            out += rm(**batch).logits[:, 0].float().tolist()
        return out
    return score


@torch.no_grad()
def sample(model, tokenizer, prompts, temperature, k, max_new_tokens, seed):
    """K samples per prompt (lists of messages), batched with left padding -> (texts, completion
    ids)."""
    tokenizer.padding_side = "left"  # generation continues from the last column, so pad on the left
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(DEVICE)
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                         max_new_tokens=max_new_tokens, num_return_sequences=k,
                         pad_token_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "right"
    new = out[:, enc["input_ids"].shape[1]:]
    ids = []
    ends = (tokenizer.eos_token_id, tokenizer.pad_token_id)
    for row in new.tolist():  # keep up to and including the first end-of-turn / EOS
        cut = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
        ids.append(row[:cut])
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids], ids


@torch.no_grad()
def sequence_logps(model, tokenizer, prompts, completion_ids, temperature, batch_size=16):
    """Summed log-probs of given completion token ids after each chat prompt (one per row), under
    softmax(logits / temperature): the distribution sample() draws from at that temperature."""
    chats = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    prompt_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = loading.pad_right(prompt_ids[i:i + batch_size], completion_ids[i:i + batch_size],
                                  tokenizer.pad_token_id)
        batch = {k: v.to(DEVICE) for k, v in batch.items()}
        logps, _, _ = ganpo.forward_logps_and_hidden(model, batch, temperature=temperature)
        out += logps.tolist()
    return out


def prompt_se(values, k):
    """Standard error of the mean of `values`, k samples per prompt in a row: the prompts are the
    independent draws, so it is the sd of the per-prompt means over √prompts (0: one prompt)."""
    means = [sum(values[i:i + k]) / k for i in range(0, len(values), k)]
    return statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else 0.0


def generation_metrics(policy, ref, tokenizer, prompts, temperature, cfg, score):
    rep = [p for p in prompts for _ in range(cfg.samples)]  # generate() repeats each prompt k times
    args = (tokenizer, prompts, temperature, cfg.samples, cfg.max_new_tokens, cfg.seed)
    pol_texts, pol_ids = sample(policy, *args)
    ref_texts, ref_ids = sample(ref, *args)
    pol_r, ref_r = score(rep, pol_texts), score(rep, ref_texts)
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(pol_r, ref_r)]
    # KL(π_θ,T‖π_ref,T) ≈ E_{y~π_θ,T}[log π_θ,T(y|x) − log π_ref,T(y|x)], π_T = softmax(logits / T):
    # the KL between the two distributions actually sampled at T (>= 0 in expectation; at T = 1 the
    # models' own KL)
    kl = [a - b for a, b in zip(sequence_logps(policy, tokenizer, rep, pol_ids, temperature),
                                sequence_logps(ref, tokenizer, rep, pol_ids, temperature))]
    n = len(pol_texts)
    return {"reward": sum(pol_r) / n, "reward_se": prompt_se(pol_r, cfg.samples),
            "ref_reward": sum(ref_r) / n, "win_rate": sum(wins) / n,
            "length": sum(len(i) for i in pol_ids) / n,
            "ref_length": sum(len(i) for i in ref_ids) / n, "distinct_2": distinct_2(pol_texts),
            "degenerate": sum(map(is_degenerate, pol_texts)) / n,
            "kl": sum(kl) / n, "example": pol_texts[0]}


# ------------------------------------------------------------------------------------------ main

def evaluate_run(run, cfg, score):
    path = os.path.join(run, "run_config.json")
    if not os.path.isfile(path):
        fail(f"{run}: no run_config.json (not a train.py output folder)")
    with open(path) as f:
        train_cfg = json.load(f)
    tokenizer = loading.load_tokenizer(train_cfg["model"])
    # the reference is the base model as train.py built it, a frozen copy (LoRA: the base alone)
    base = loading.load_policy(train_cfg["model"], tokenizer, train_cfg["seed"])
    ref = ganpo.make_reference(base).to(DEVICE)
    try:
        if os.path.isfile(os.path.join(run, "adapter_config.json")):  # LoRA: base + adapter
            policy = scaleout.load_adapter(base, run)  # merged into base; ref: the copy before
        else:
            from transformers import AutoModelForCausalLM
            policy = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
        del base  # a full fine-tuning run's base is no longer needed (LoRA's is the policy now)
        policy = loading.disable_dropout(policy).eval().to(DEVICE)
    except ImportError:
        fail(f"{run}: a LoRA run; loading its adapter needs peft: pip install peft")
    except (OSError, ValueError) as e:
        fail(f"{run}: cannot load the saved policy ({type(e).__name__})")
    names = {f.name for f in dataclasses.fields(ganpo.GANPOConfig)}  # the run's objective
    method = ganpo.GANPOConfig(**{k: v for k, v in train_cfg.items() if k in names})
    discs = load_discriminators(run, method, policy.config.hidden_size)
    data = cfg.data or train_cfg["data"]
    result = {"run": run, "train_config": train_cfg, "splits": {}}
    for split in [s for s in cfg.split.split(",") if s]:
        try:
            rows = loading.read_rows(data, split)
        except ValueError as e:
            fail(str(e))
        rows = rows[:cfg.limit] if cfg.limit else rows
        examples, dropped = loading.tokenize_rows(rows, tokenizer, train_cfg["max_length"],
                                                  train_cfg["max_prompt_length"])
        if not examples:
            fail(f"--data {data} [{split}]: no pairs left after truncation")
        batches = [{k: v.to(DEVICE) for k, v in b.items()}
                   for b in loading.batches_of(examples, cfg.batch_size, tokenizer.pad_token_id)]
        progress(f"{run} [{split}]: preferences, latent drift"
                 f"{' and discriminators' if discs else ''} on {len(examples)} pairs")
        prefs, latents = ganpo.evaluate(policy, ref, batches, method, nullcontext, latents=True,
                                        discs=discs)
        latents = {k: v.cpu() for k, v in latents.items()}
        split_result = {"pairs": len(examples), "dropped": dropped, **prefs,
                        **latent_drift(latents, cfg.seed), "generation": {}}
        prompts = [r["prompt"] if isinstance(r["prompt"], list)
                   else [{"role": "user", "content": r["prompt"]}]
                   for r in rows[:min(cfg.gen_prompts, len(rows))]]
        for t in [float(x) for x in cfg.temperatures.split(",") if x]:
            progress(f"{run} [{split}]: {cfg.samples} samples of {len(prompts)} prompts at T = "
                     f"{t:g}, policy and reference")
            split_result["generation"][str(t)] = generation_metrics(policy, ref, tokenizer,
                                                                    prompts, t, cfg, score)
        result["splits"][split] = split_result
    return result


def load_discriminators(run, method, d_model):
    """The trained discriminators from RUN/checkpoint.pt, in eval mode, or None (DPO has none).
    mmap: only the discriminators' tensors are read from the checkpoint, not the policy's."""
    path = os.path.join(run, "checkpoint.pt")
    if not os.path.isfile(path) or method.adv_weight == 0:
        return None
    try:
        state = loading.load_checkpoint(path)
    except ValueError as e:
        fail(str(e))
    if state.get("discs") is None:
        return None
    discs = ganpo.build_discriminators(d_model, method)
    discs.load_state_dict(state["discs"])
    return discs.to(DEVICE).eval()


def run_names(results):
    """Folder names, or the paths as given when two runs share a folder name."""
    names = [os.path.basename(os.path.normpath(r["run"])) for r in results]
    return names if len(set(names)) == len(names) else [os.path.normpath(r["run"]) for r in results]


def print_table(results):
    names = run_names(results)
    splits = list(results[0]["splits"])
    rows = [("pairs", "pairs", "{:.0f}"), ("rewards/accuracies", "pref accuracy", "{:.3f}"),
            ("rewards/margins", "reward margin", "{:.3f}"), ("opo/loss", "loss", "{:.4f}"),
            ("latent/cosine", "latent cosine", "{:.4f}"), ("latent/mmd2", "latent MMD²", "{:.4f}"),
            ("latent/probe_accuracy", "probe accuracy", "{:.3f}")]
    disc_rows = [("disc/auc_real_fake", "D AUC ref > policy"),
                 ("disc/auc_fake_contrast", "D AUC policy > other")]
    gen_rows = [("reward", "reward"), ("win_rate", "win rate vs ref"), ("kl", "KL, both at T"),
                ("length", "length (tokens)"), ("distinct_2", "distinct-2"),
                ("degenerate", "degenerate share")]
    width = max(14, *(len(n) for n in names))
    for split in splits:
        print(f"\n== {split} ==")
        print(f"{'':<24}" + "".join(f"{n:>{width + 2}}" for n in names))
        for key, label, fmt in rows:
            print(f"{label:<24}" + "".join(f"{fmt.format(r['splits'][split][key]):>{width + 2}}"
                                           for r in results))
        if any("disc/auc_real_fake" in r["splits"][split] for r in results):
            print("discriminators' view (the trained discriminators on these pairs; 0.5 = chance)")
            for key, label in disc_rows:
                cells = [f"{r['splits'][split][key]:.3f}" if key in r["splits"][split] else "-"
                         for r in results]
                print(f"{label:<24}" + "".join(f"{c:>{width + 2}}" for c in cells))
        for t in results[0]["splits"][split]["generation"]:
            for key, label in gen_rows:
                print(f"{label + ' @T=' + t:<24}" + "".join(
                    f"{r['splits'][split]['generation'][t][key]:>{width + 2}.3f}" for r in results))


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    return plt


def save(fig, path):
    """Write the PNG whole or not at all."""
    loading.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    print(f"plot: {path}")


def plot(results, path):
    plt = pyplot()
    splits = list(results[0]["splits"])
    fig, axes = plt.subplots(2, len(splits), figsize=(5 * len(splits), 8), squeeze=False)
    for j, split in enumerate(splits):
        for r, name in zip(results, run_names(results)):
            gen = r["splits"][split]["generation"]
            temps = [float(t) for t in gen]
            rewards = [gen[t]["reward"] for t in gen]
            axes[0][j].plot([gen[t]["kl"] for t in gen], rewards, "o-", label=name)
            axes[1][j].plot(temps, rewards, "o-", label=name)
        first = results[0]["splits"][split]["generation"]
        axes[1][j].plot([float(t) for t in first], [first[t]["ref_reward"] for t in first], "k--",
                        label="reference")
        axes[0][j].set(title=f"{split}: reward vs KL", xlabel="sampled KL(policy_T‖ref_T)",
                       ylabel="mean reward")
        axes[1][j].set(title=f"{split}: reward vs temperature", xlabel="temperature",
                       ylabel="mean reward")
        axes[0][j].legend()
        axes[1][j].legend()
    fig.tight_layout()
    save(fig, path)


def plot_curves(run):
    """RUN/curves.png from RUN/metrics.jsonl: what train.py logged, per step (lines) and at each
    held-out evaluation (markers), with the discriminators' diagnostics in the bottom row."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        fail(f"{path}: no such file (is {run} a train.py --output_dir?)")
    with open(path) as f:
        try:
            lines = [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            fail(f"{path}: not a metrics log ({e.msg})")
    steps = [m for m in lines if "split" not in m]
    evals = {}
    for m in lines:
        if "split" in m:
            evals.setdefault(m["split"], []).append(m)
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))

    def draw(ax, key, label, held_out_key=None, held_out_label=None):
        """One logged value per step (a line), its held-out counterpart at each evaluation
        (markers)."""
        logged = [m for m in steps if key in m]
        line = ax.plot([m["step"] for m in logged], [m[key] for m in logged], label=label)
        name = label if held_out_label is None else held_out_label
        for split, ms in evals.items():
            ms = [m for m in ms if held_out_key in m] if held_out_key else []
            if ms:
                ax.plot([m["step"] for m in ms], [m[held_out_key] for m in ms], "o--",
                        color=line[0].get_color(), label=f"{name}, held-out {split}".lstrip(", "))

    draw(axes[0][0], "loss", "total loss")
    draw(axes[0][0], "opo/loss", "preference loss", "eval/opo/loss")
    draw(axes[0][1], "rewards/margins", "reward margin", "eval/rewards/margins")
    draw(axes[0][2], "rewards/accuracies", "batch", "eval/rewards/accuracies", "")
    titles = ("loss", "reward margin (chosen − rejected)", "preference accuracy")
    for ax, title in zip(axes[0], titles):
        ax.set(title=title, xlabel="step")
    if not any("disc/loss" in m for m in steps):
        for ax in axes[1]:
            ax.axis("off")
        axes[1][1].text(0.5, 0.5, "no discriminators in this run (--adv_weight 0)", ha="center")
    else:
        draw(axes[1][0], "disc/real_fake_loss", "D real/fake pair")
        draw(axes[1][0], "disc/contrast_loss", "D contrastive pair")
        draw(axes[1][0], "gen/loss", "generator")
        axes[1][0].axhline(math.log(2), color="gray", lw=0.8, label="ln 2 (chance)")
        draw(axes[1][1], "disc/real_fake_acc", "real > fake, batch accuracy",
             "eval/disc/auc_real_fake", "real > fake, AUC")
        draw(axes[1][1], "disc/contrast_acc", "fake > other polarity, batch accuracy",
             "eval/disc/auc_fake_contrast", "fake > other polarity, AUC")
        axes[1][1].axhline(0.5, color="gray", lw=0.8)
        for name in ("chosen", "rejected"):
            draw(axes[1][2], f"disc/{name}/weight_change", f"{name} discriminator")
        axes[1][2].set_yscale("symlog", linthresh=1e-4)  # frozen discriminators stay at exactly 0
        titles = ("discriminator losses", "discriminator accuracy (batch), AUC (held-out)",
                  "‖θ_D − θ_D,0‖ / ‖θ_D,0‖")
        for ax, title in zip(axes[1], titles):
            ax.set(title=title, xlabel="step")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(run)
    fig.tight_layout()
    save(fig, os.path.join(run, "curves.png"))


def main():
    parser = HfArgumentParser(EvalConfig)
    args = sys.argv[1:]
    runs = []
    while args and not args[0].startswith("-"):  # positional run folders
        runs.append(args.pop(0))
    cfg = parser.parse_args_into_dataclasses(args=args)[0]
    cfg.runs = runs or cfg.runs
    for run in cfg.runs:
        if not os.path.isdir(run):
            fail(f"{run}: no such run folder (train.py --output_dir)")
    if cfg.curves:
        for run in cfg.runs:
            plot_curves(run)
        return
    score = make_scorer(cfg.reward_model)
    results = [evaluate_run(run, cfg, score) for run in cfg.runs]
    progress("done")
    print_table(results)
    out = cfg.out or (os.path.join(cfg.runs[0], "eval.json") if len(cfg.runs) == 1 else "eval.json")
    loading.write_text(out, json.dumps({"settings": asdict(cfg), "results": results}, indent=1))
    print(f"\nwrote {out}")
    plot(results, cfg.plot or os.path.splitext(out)[0] + ".png")


if __name__ == "__main__":
    main()
