"""One or two optimizer steps of the authors' GANPO and of ours, from the same start.

The authors' code (github.com/enyijiang/GANPO, GANPO_trl.py, at 58ca06d) subclasses the DPOTrainer
of an older TRL than this project's, so the comparison runs in an environment of its own, not in CI:

    python -m venv .venv-authors
    .venv-authors/bin/pip install torch==2.13.0 "transformers==4.57.*" trl==0.26.2 peft \
        accelerate datasets gguf
    git clone https://github.com/enyijiang/GANPO ../GANPO
    .venv-authors/bin/python scripts/compare_authors.py --authors ../GANPO   # ~2 min, 2 CPU cores

Their file runs unedited, through its own trainer (`QuadGANDPOTrainer.train()`): this script only
wraps its methods to record what they return, and gives ours the same start:
- the same SmolLM2-135M-Instruct weights (the packaged model, as train.py loads it), float32,
  dropout 0;
- the same token ids: the batches their trainer collates, 3 pairs of a 16-token prompt and two
  48-token completions (every row is cut to that length, so there is no padding);
- the same discriminator weights, copied from theirs into ours, dropout 0; on both sides each
  spectral-normalised layer's u, v set to its weight's exact top singular vectors (see
  docs/departures.md: their legacy hook starts from random vectors, ours after 15 iterations);
- the same learning rates at each step: the policy's constant, the discriminators' read off their
  hard-coded cosine schedule and set on ours;
- ours: ganpo.ganpo_step with the default GANPOConfig (alternating, quad loss, all tokens, μ = 0.9).
Prints one table (quantity, ours, theirs, relative difference) and writes a JSON record (--out).
"""

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ganpo  # noqa: E402
import loading  # noqa: E402

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing near an old red barn "
    "and two tired farmers walk home"
).split()
PROMPT_TOKENS, COMPLETION_TOKENS, PAIRS = 16, 48, 3
# our running means -> theirs (D_w: real = the reference's chosen "pos", fake = the policy's,
# contrast = the reference's rejected "neg"; D_l the mirror image)
RUNNING_MEANS = {
    "chosen/real": "running_mean_pos",
    "chosen/fake": "running_mean_policy",
    "chosen/contrast": "running_mean_neg",
    "rejected/real": "running_mean_neg_rej",
    "rejected/fake": "running_mean_policy_rejected_rej",
    "rejected/contrast": "running_mean_pos_rej",
}


def rows(n, seed=0):
    """Standard rows far longer than 16 + 48 tokens: TRL's truncation leaves all the same length."""
    rng = random.Random(seed)

    def text(words):
        return " ".join(rng.choice(WORDS) for _ in range(words))

    return [{"prompt": text(40), "chosen": text(90), "rejected": text(90)} for _ in range(n)]


def our_discriminator_state(theirs):
    """The state dict of the authors' TransformerDiscriminator (legacy spectral-norm hook) under the
    names of our Discriminator with torch's spectral-norm parametrization."""
    out = {}
    for name, value in theirs.items():
        name = name.replace("project_in.", "proj.").replace("transformer.", "encoder.")
        if name == "pos_embedding":  # theirs (1, max_len, d), ours (max_len, d)
            name, value = "pos", value[0]
        for suffix, ours in (
            ("weight_orig", "parametrizations.weight.original"),
            ("weight_u", "parametrizations.weight.0._u"),
            ("weight_v", "parametrizations.weight.0._v"),
        ):
            if name.endswith("." + suffix):
                name = name[: -len(suffix)] + ours
        out[name] = value
    return out


def spectral_layers(module):
    """-> (weight, u, v) of each spectral-normalised layer (torch's parametrization or hook)."""
    found = []
    for m in module.modules():
        if hasattr(m, "parametrizations") and "weight" in m.parametrizations:
            sn = m.parametrizations.weight[0]
            found.append((m.parametrizations.weight.original, sn._u, sn._v))
        elif hasattr(m, "weight_orig"):
            found.append((m.weight_orig, m.weight_u, m.weight_v))
    return found


@torch.no_grad()
def exact_power_iteration_start(module):
    """Set each spectral-normalised layer's u, v to its weight's top singular vectors: σ's estimate
    is then exact from the first call, whichever implementation holds them."""
    for weight, u, v in spectral_layers(module):
        U, _, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        u.copy_(U[:, 0].to(u.dtype))
        v.copy_(Vh[0].to(v.dtype))


def our_batch(trl_batch, pad_id):
    """A batch of TRL's DPO collator (prompt, chosen, rejected ids and masks) as ours: [chosen;
    rejected] rows."""
    examples = []
    for i in range(len(trl_batch["prompt_input_ids"])):

        def ids(part):
            keep = trl_batch[f"{part}_attention_mask"][i].bool()
            return trl_batch[f"{part}_input_ids"][i][keep].tolist()

        examples.append(
            {"prompt": ids("prompt"), "chosen": ids("chosen"), "rejected": ids("rejected")}
        )
    return loading.collate(examples, pad_id)


def relative_difference(ours, theirs):
    """|ours − theirs| / |theirs| for numbers, ‖ours − theirs‖ / ‖theirs‖ for lists of tensors."""
    if isinstance(theirs, list):
        num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(ours, theirs))
        den = sum(float(b.double().pow(2).sum()) for b in theirs)
        return (num / den) ** 0.5 if den else float("inf")
    return abs(ours - theirs) / abs(theirs) if theirs else abs(ours)


def norm(tensors):
    return sum(float(t.double().pow(2).sum()) for t in tensors) ** 0.5


def table(rows_):
    """rows_: (quantity, ours, theirs, relative difference) -> the printed table."""
    lines = [f"{'quantity':<44} {'ours':>14} {'theirs':>14} {'rel. diff':>10}"]
    lines += [f"{q:<44} {o:>14.7g} {t:>14.7g} {r:>10.1e}" for q, o, t, r in rows_]
    return "\n".join(lines)


def load_tokenizer(folder):
    """The model's tokenizer. A folder saved by transformers 5 names a class 4.x lacks: build it
    from the folder's files."""
    try:
        return loading.load_tokenizer(folder)
    except ValueError:
        from transformers import PreTrainedTokenizerFast

        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            special = {
                k: v for k, v in json.load(f).items() if k.endswith("_token") and isinstance(v, str)
            }
        return PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(folder, "tokenizer.json"), **special
        )


def load_model(folder):
    model = loading.disable_dropout(loading.load_policy(folder, None, dtype=torch.float32))
    return model.train()


def watch_optimizer(optimizer, params, log):
    """Record, before each step, the learning rate and the (clipped) gradients it will apply."""

    def record(opt, args, kwargs):
        log.append(
            {
                "lr": opt.param_groups[0]["lr"],
                "grads": [p.grad.detach().clone() for p in params] if params else None,
            }
        )

    getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(record)


def run_theirs(authors, folder, tokenizer, steps, lr):
    """The authors' trainer, unedited, for `steps` steps -> what it computed, and its start."""
    spec = importlib.util.spec_from_file_location(
        "GANPO_trl", os.path.join(authors, "GANPO_trl.py")
    )
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    from datasets import Dataset
    from trl import DPOConfig

    torch.manual_seed(0)
    model, ref = load_model(folder), load_model(folder).eval()
    d_model = model.config.hidden_size
    discs = {
        side: theirs.TransformerDiscriminator(input_dim=d_model, dropout=0.0)
        for side in ("chosen", "rejected")
    }
    for d in discs.values():
        exact_power_iteration_start(d)
    start = {
        "policy": [p.detach().clone() for p in model.parameters()],
        "discs": {
            side: {k: v.clone() for k, v in d.state_dict().items()} for side, d in discs.items()
        },
    }
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=PAIRS,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_prompt_length=PROMPT_TOKENS,
        max_completion_length=COMPLETION_TOKENS,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        bf16=False,
    )  # TRL's configs default to bf16 autocast where it is available
    trainer = theirs.QuadGANDPOTrainer(
        disc_chosen=discs["chosen"],
        disc_rejected=discs["rejected"],
        projector=None,
        best_model=None,
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(rows(PAIRS)),
        processing_class=tokenizer,
    )
    seen = {"batches": [], "disc_losses": [], "specs": [], "policy_opt": [], "disc_opt": []}
    forward, disc_loss, loss = (
        trainer.concatenated_forward,
        trainer.compute_loss_disc,
        trainer.compute_loss,
    )

    def concatenated_forward(model, batch, is_ref_model=False):
        if not is_ref_model:
            seen["batches"].append(
                {k: v.detach().clone() for k, v in batch.items() if torch.is_tensor(v)}
            )
        return forward(model, batch, is_ref_model=is_ref_model)

    def compute_loss_disc(*a, **kw):
        out = disc_loss(*a, **kw)
        seen["disc_losses"].append([float(x.detach()) for x in out])
        return out

    def compute_loss(*a, **kw):
        out = loss(*a, **kw)
        seen["specs"].append({k: float(v.detach()) for k, v in out[1].items()})
        return out

    create = trainer.create_optimizer_and_scheduler

    def create_optimizer_and_scheduler(num_training_steps):
        create(num_training_steps)
        watch_optimizer(trainer.optimizer, list(model.parameters()), seen["policy_opt"])
        watch_optimizer(trainer.disc_chosen_optimizer, None, seen["disc_opt"])

    trainer.concatenated_forward = concatenated_forward
    trainer.compute_loss_disc = compute_loss_disc
    trainer.compute_loss = compute_loss
    trainer.create_optimizer_and_scheduler = create_optimizer_and_scheduler
    trainer.train()
    seen["policy"] = [p.detach().clone() for p in model.parameters()]
    seen["discs"] = {
        side: [p.detach().clone() for p in d.parameters()]
        for side, d in (("chosen", trainer.disc_chosen), ("rejected", trainer.disc_rejected))
    }
    seen["ema"] = {ours: float(getattr(trainer, name)) for ours, name in RUNNING_MEANS.items()}
    return seen, start


def run_ours(folder, seen, start, pad_id, update):
    """ganpo.ganpo_step on their batches, from their start, at their learning rates."""
    cfg = ganpo.GANPOConfig(disc_dropout=0.0, update=update)
    policy = load_model(folder)
    ref = ganpo.make_reference(policy)
    discs = ganpo.build_discriminators(policy.config.hidden_size, cfg)
    for side, d in discs.items():
        d.load_state_dict(our_discriminator_state(start["discs"][side]))
    with torch.no_grad():
        for p, q in zip(policy.parameters(), start["policy"]):
            p.copy_(q)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=1.0, weight_decay=0.0)
    disc_opt = torch.optim.AdamW(discs.parameters(), lr=1.0, weight_decay=0.01)  # as theirs
    out = {"steps": [], "policy_opt": [], "disc_opt": []}
    watch_optimizer(policy_opt, list(policy.parameters()), out["policy_opt"])
    ema = {}
    for step, batch in enumerate(seen["batches"]):
        policy_opt.param_groups[0]["lr"] = seen["policy_opt"][step]["lr"]
        disc_opt.param_groups[0]["lr"] = seen["disc_opt"][step]["lr"]
        out["steps"].append(
            ganpo.ganpo_step(
                policy,
                ref,
                discs,
                policy_opt,
                disc_opt,
                [our_batch(batch, pad_id)],
                cfg,
                ema,
                nullcontext,
                max_grad_norm=1.0,
            )
        )
    out["policy"] = [p.detach().clone() for p in policy.parameters()]
    out["discs"] = {side: [p.detach().clone() for p in d.parameters()] for side, d in discs.items()}
    out["ema"] = {k: float(v) for k, v in ema.items()}
    return out


def compare(ours, theirs, start):
    """-> rows (quantity, ours, theirs, relative difference)."""
    out = []
    for s, (m, (d_w, d_l), spec, opt, mine) in enumerate(
        zip(
            ours["steps"],
            theirs["disc_losses"],
            theirs["specs"],
            theirs["policy_opt"],
            ours["policy_opt"],
        ),
        1,
    ):
        g_theirs = (spec["g_loss_mimic"] + spec["g_loss_mimic_rej"]) / 2
        for name, a, b in (
            (f"step {s}: L_D of D_w", m["disc/chosen/loss"], d_w),
            (f"step {s}: L_D of D_l", m["disc/rejected/loss"], d_l),
            (f"step {s}: DPO loss", m["opo/loss"], spec["dpo_loss"]),
            (f"step {s}: L_G (after D's step)", m["gen/loss"], g_theirs),
        ):
            out.append((name, a, b, relative_difference(a, b)))
        out.append(
            (
                f"step {s}: policy gradient (norm; diff of vectors)",
                norm(mine["grads"]),
                norm(opt["grads"]),
                relative_difference(mine["grads"], opt["grads"]),
            )
        )
    for key in RUNNING_MEANS:
        out.append(
            (
                f"running mean m̄ {key}",
                ours["ema"][key],
                theirs["ema"][key],
                relative_difference(ours["ema"][key], theirs["ema"][key]),
            )
        )
    moved = [[p - q for p, q in zip(run["policy"], start["policy"])] for run in (ours, theirs)]
    n = len(ours["steps"])
    out.append(
        (
            f"policy weights after {n} steps (norm)",
            norm(ours["policy"]),
            norm(theirs["policy"]),
            relative_difference(ours["policy"], theirs["policy"]),
        )
    )
    out.append(
        (
            f"policy update over {n} steps (norm)",
            norm(moved[0]),
            norm(moved[1]),
            relative_difference(*moved),
        )
    )
    for side, name in (("chosen", "D_w"), ("rejected", "D_l")):
        out.append(
            (
                f"{name} weights after {n} steps (norm)",
                norm(ours["discs"][side]),
                norm(theirs["discs"][side]),
                relative_difference(ours["discs"][side], theirs["discs"][side]),
            )
        )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", required=True, help="a clone of github.com/enyijiang/GANPO")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps on each side")
    parser.add_argument(
        "--lr", type=float, default=5e-5, help="policy learning rate (theirs: D's is half)"
    )
    parser.add_argument(
        "--update", default="alternating", help="our --update: alternating | simultaneous"
    )
    parser.add_argument(
        "--model", default="smollm2", help="as train.py: smollm2 (packaged) or a model folder"
    )
    parser.add_argument("--out", default="compare_authors.json", help="the JSON record")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.authors, "GANPO_trl.py")):
        loading.fail(
            f"--authors {args.authors}: no GANPO_trl.py there (clone github.com/enyijiang/GANPO)"
        )
    if args.steps < 1 or args.update not in ("alternating", "simultaneous"):
        loading.fail("--steps must be >= 1 and --update alternating or simultaneous")
    try:
        import trl
    except ImportError:
        loading.fail("the authors' code needs TRL 0.26: run this in its own environment (see the "
                     "top of this file)")
    folder = loading.smollm2_folder() if args.model == "smollm2" else args.model
    tokenizer = load_tokenizer(folder)
    theirs, start = run_theirs(args.authors, folder, tokenizer, args.steps, args.lr)
    ours = run_ours(folder, theirs, start, tokenizer.pad_token_id, args.update)
    result = compare(ours, theirs, start)
    print(table(result))
    commit = subprocess.run(
        ["git", "-C", args.authors, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    import transformers

    record = {
        "authors_commit": commit or None,
        "steps": args.steps,
        "lr": args.lr,
        "update": args.update,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "learning_rates": [
            {"policy": p["lr"], "discriminators": d["lr"]}
            for p, d in zip(theirs["policy_opt"], theirs["disc_opt"])
        ],
        "rows": [
            {"quantity": q, "ours": o, "theirs": t, "relative_difference": r}
            for q, o, t, r in result
        ],
    }
    loading.write_text(args.out, json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
