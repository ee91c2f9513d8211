"""Train a causal LM with GANPO (or plain DPO/SimPO/IPO with --adv_weight 0).

    python train.py                               # SmolLM2-135M, bundled data, 2 CPU cores:
                                                  # 7-8 min with bf16 units, ~11 min without
    python train.py --model tiny --max_steps 5    # smoke test in seconds
    python train.py --help                        # every flag
    torchrun --standalone --nproc_per_node 2 train.py   # the same run on 2 processes (FSDP2)

Each optimizer step (ganpo.ganpo_step) alternates: the discriminators learn on this step's
detached latents (--disc_steps updates), then the policy steps on L_OPO + λ·L_G, with L_G through
the updated, frozen discriminators (--update simultaneous: both from the same D, an ablation).

The authors' discriminator settings, the defaults, as one set of flags (their 2-pair micro-batches,
over which the running means move, are --grad_accum 4 at --batch_size 8):
    --update alternating --disc_init xavier --disc_max_grad_norm 0 --disc_lr_ratio 0.5
    --disc_steps 1 --disc_loss quad --disc_tokens all --disc_dim 512 --disc_layers 2
    --disc_heads 8 --disc_dropout 0.1 --ema_decay 0.9 --adv_weight 1
Read top to bottom: the config, setup (models, data, optimizers, resume), the loop. Lines marked
`torchrun:` or `LoRA:` do nothing on the default run; scaleout.py holds what they call.
"""
import json
import math
import os
import random
import signal
import sys
import time
import types
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import transformers
from tqdm import tqdm
from transformers import HfArgumentParser

import ganpo
import loading
import scaleout
from ganpo import option
from loading import fail


@dataclass
class Config(ganpo.GANPOConfig):  # the objective's and discriminators' flags come from ganpo.py
    # model and data
    model: str = option("smollm2", "smollm2 (packaged, offline) | tiny (random, smoke tests) | HF "
                                   "id or folder")
    data: str = option("bundled", "bundled (data/*.jsonl) | a .jsonl or .json file | a HF dataset "
                                  "name")
    train_split: str = option("train", "split to train on")
    eval_split: str = option("test", "held-out split, evaluated every --eval_every steps and at "
                                     "the end")
    eval_data: str = option("", "held-out data, if not --data's --eval_split (a file: its last "
                                "10%%)")
    final_eval_splits: str = option("", "extra splits scored at the end, e.g. shift (comma list)")
    eval_pairs: int = option(48, "held-out pairs in each periodic evaluation (0 = all); the final: "
                                 "all")
    limit: int = option(0, "first N pairs of each split, training and held-out (0 = all; --model "
                           "tiny: 32)")
    output_dir: str = option("out/ganpo-smollm2", "policy (save_pretrained), checkpoint.pt, "
                                                  "metrics.jsonl, run_config.json")
    max_length: int = option(128, "tokens per sequence, prompt + completion")
    max_prompt_length: int = option(64, "prompt tokens kept (its end) before the completion is cut")
    # optimisation
    max_steps: int = option(32, "policy optimizer steps (0 = save the untrained policy)")
    batch_size: int = option(8, "preference pairs per optimizer step (--model tiny: 4)")
    grad_accum: int = option(1, "micro-batches per optimizer step (divides batch_size)")
    lr: float = option(5e-5, "peak policy learning rate (high: the default run is 32 steps)")
    warmup_steps: int = option(3, "linear warmup steps, then cosine decay to lr/10")
    weight_decay: float = option(0.0, "policy AdamW weight decay")
    max_grad_norm: float = option(1.0, "policy gradient clipping (0 = off)")
    disc_lr: Optional[float] = option(None, "peak discriminator lr, absolute (overrides "
                                            "--disc_lr_ratio); 0 = frozen")
    disc_lr_ratio: float = option(0.5, "peak discriminator lr / policy lr (authors: 0.5); 0 = "
                                       "frozen")
    dtype: str = option("auto", "auto (bf16 autocast on bf16 units, else fp32) | bf16 | fp32")
    gradient_checkpointing: bool = option(False, "recompute decoder activations in backward")
    seed: int = option(0, "seeds data order, label noise, discriminators, tiny model")
    label_noise: float = option(0.0, "fraction of training pairs with chosen/rejected swapped")
    # LoRA: adapters on a frozen base; the reference is the base with the adapters off
    lora_r: int = option(0, "LoRA rank (0 = off: full fine-tuning); needs `pip install peft`")
    lora_alpha: float = option(16.0, "LoRA scale numerator (the update is alpha/r · B·A)")
    lora_dropout: float = option(0.05, "dropout on the LoRA branch (off in the reference forward)")
    lora_targets: str = option("all-linear", "modules that get adapters: all-linear (every decoder "
                                             "linear layer) or e.g. q_proj,v_proj")
    merge_lora: bool = option(False, "also save the base with the adapters merged, to "
                                     "OUTPUT/merged")
    # bookkeeping
    log_every: int = option(5, "steps between log lines (metrics.jsonl gets every step)")
    eval_every: int = option(15, "steps between held-out evaluations (0 = only at the end)")
    save_every: int = option(50, "steps between checkpoints (always at the end)")
    resume: bool = option(False, "continue the run in --output_dir exactly where it stopped")


# --model tiny, for smoke tests: a discriminator its size, few and small batches (flags override)
TINY_DEFAULTS = {"disc_dim": 32, "disc_heads": 2, "limit": 32, "batch_size": 4}


def parse_config():
    parser = HfArgumentParser(Config)
    try:
        cfg = parser.parse_args_into_dataclasses()[0]
        if cfg.model == "tiny":
            parser.set_defaults(**TINY_DEFAULTS)
            cfg = parser.parse_args_into_dataclasses()[0]
    except ValueError as e:  # GANPOConfig checks the method's fields: "disc_steps 0: expected ..."
        fail(f"--{e}")
    check_config(cfg, world=int(os.environ.get("WORLD_SIZE", 1)))  # torchrun sets WORLD_SIZE
    return cfg


def check_config(cfg, world=1):
    """The run's own flags (GANPOConfig has checked the method's)."""
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        fail(f"--dtype {cfg.dtype}: expected auto, bf16 or fp32")
    if (cfg.disc_lr is not None and cfg.disc_lr < 0) or cfg.disc_lr_ratio < 0:
        fail("--disc_lr and --disc_lr_ratio must be >= 0 (0 = frozen discriminators)")
    if cfg.grad_accum < 1 or cfg.batch_size % (world * cfg.grad_accum):
        fail(f"--batch_size {cfg.batch_size} must be a multiple of --grad_accum {cfg.grad_accum}"
             if world == 1 else f"--batch_size {cfg.batch_size} must be a multiple of {world} "
             f"processes x --grad_accum {cfg.grad_accum}")
    if cfg.latent_reg == "mmd" and cfg.batch_size // (world * cfg.grad_accum) < 2:
        fail("--latent_reg mmd compares the pairs of a micro-batch: it needs at least 2 "
             "(--batch_size / --grad_accum)")
    if not 0 <= cfg.label_noise <= 1:
        fail(f"--label_noise {cfg.label_noise}: expected a fraction in [0, 1]")
    if cfg.lora_r < 0 or not 0 <= cfg.lora_dropout < 1:
        fail("--lora_r must be >= 0 (0 = off) and --lora_dropout in [0, 1)")
    if cfg.lora_r and world > 1:
        fail("--lora_r with torchrun is not supported (LoRA is for one GPU here; FSDP for "
             "several)")
    if cfg.merge_lora and not cfg.lora_r:
        fail("--merge_lora needs --lora_r > 0")
    if cfg.max_steps < 0 or cfg.max_length < 2 or cfg.max_prompt_length < 1 or cfg.limit < 0:
        fail("--max_steps and --limit must be >= 0, --max_length >= 2, --max_prompt_length >= 1")


def settings_without_effect(cfg):
    """Flags set away from their defaults that change nothing under the others -> one line each.
    Accepting a setting and ignoring it in silence is the commonest trust bug of DPO code."""
    defaults = Config(**(TINY_DEFAULTS if cfg.model == "tiny" else {}))
    no_game, frozen = cfg.adv_weight == 0, disc_peak_lr(cfg) == 0
    held_from_file = cfg.data.endswith((".jsonl", ".json")) and not cfg.eval_data
    rules = [  # (flags, when they do nothing, why)
        (["gamma"], cfg.loss != "simpo", f"only --loss simpo uses it (--loss {cfg.loss})"),
        (["label_smoothing"], cfg.loss != "dpo", f"only --loss dpo uses it (--loss {cfg.loss})"),
        (["latent_weight"], cfg.latent_reg != "mmd", "it weighs --latent_reg mmd, which is off"),
        (["disc_dim", "disc_layers", "disc_heads", "disc_dropout", "disc_loss", "disc_steps",
          "disc_init", "disc_sn", "disc_max_grad_norm", "update", "ema_decay", "disc_lr",
          "disc_lr_ratio"], no_game, "--adv_weight 0 builds no discriminators"),
        (["disc_tokens"], no_game and cfg.latent_reg != "mmd",
         "--adv_weight 0 builds no discriminators; it changes only the logged latent/mmd"),
        (["disc_steps", "disc_dropout", "disc_max_grad_norm", "update"], frozen and not no_game,
         "frozen discriminators (a peak rate of 0) never step and run in eval mode"),
        (["disc_lr_ratio"], cfg.disc_lr is not None and not no_game, "--disc_lr overrides it"),
        (["lora_alpha", "lora_dropout", "lora_targets"], not cfg.lora_r,
         "LoRA is off (--lora_r 0)"),
        (["eval_pairs"], cfg.eval_every == 0, "it sizes the periodic evaluations, off at "
         "--eval_every 0 (the final one scores every pair)"),
        (["eval_split", "final_eval_splits"], held_from_file,
         f"--data {cfg.data} is a file: its last 10% is held out (--eval_data names another)"),
        (["train_split"], cfg.data.endswith(".jsonl"), f"--data {cfg.data} has no splits")]
    return [f"--{name} {getattr(cfg, name)} has no effect: {why}"
            for names, applies, why in rules if applies
            for name in names if getattr(cfg, name) != getattr(defaults, name)]


def get_lr(step, max_steps, lr, warmup_steps, min_lr_ratio=0.1):
    """Linear warmup, then cosine decay to min_lr_ratio·lr at max_steps (as nanoGPT's)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------- setup

def load_tokenizer(cfg):
    try:
        return loading.load_tokenizer(cfg.model)
    except ValueError as e:
        fail(str(e))


def load_models(cfg, tokenizer, device, world, use_bf16):
    """-> policy (train mode), ref (the frozen initial policy)."""
    try:
        # LoRA: the base never meets an optimizer; on a bf16 GPU it is kept in bf16 (half memory)
        dtype = torch.bfloat16 if cfg.lora_r and use_bf16 else torch.float32
        policy = loading.load_policy(cfg.model, tokenizer, cfg.seed, dtype=dtype)
        if cfg.lora_r:  # LoRA: adapters on the frozen base
            policy = scaleout.add_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                       cfg.lora_targets)
    except ValueError as e:
        fail(str(e))
    ref = ganpo.make_reference(policy)  # LoRA: the base, adapters off
    if cfg.gradient_checkpointing:
        scaleout.enable_checkpointing(policy)
    if world == 1:
        policy, ref = policy.to(device), ref.to(device)
    else:  # torchrun: FSDP2 shards both alike (and moves the shards to this rank's GPU)
        policy = scaleout.shard(policy, use_bf16, ganpo.forward_logps_and_hidden)
        ref = scaleout.shard(ref, use_bf16, ganpo.forward_logps_and_hidden)
    return policy.train(), ref


def read_split(data, split):
    try:
        return loading.read_rows(data, split)
    except ValueError as e:
        fail(str(e))


def tokenize_split(cfg, tokenizer, rows, what):
    """Tokenise one split, say what was dropped, and fail with one line if nothing is left."""
    examples, dropped = loading.tokenize_rows(rows, tokenizer, cfg.max_length,
                                              cfg.max_prompt_length)
    merged = sum(e["boundary_merged"] for e in examples)
    print(f"{what}: {len(examples)} pairs"
          + (f" | {dropped} dropped: no completion tokens left after truncation to --max_length "
             f"{cfg.max_length}" if dropped else "")
          + (f" | {merged} with a token merged across the prompt/completion boundary"
             if merged else ""))
    if not examples:
        fail(f"--data {cfg.data} ({what}): no pairs left after filtering (check --max_length / "
             "--max_prompt_length)")
    return examples


def load_data(cfg, tokenizer):
    """-> (training pairs, {split: held-out pairs}); the first held-out split is evaluated
    periodically. A single file without --eval_data keeps its last 10% out of training."""
    is_file = cfg.data.endswith((".jsonl", ".json"))
    train_rows = read_split(cfg.data, cfg.train_split)
    if cfg.eval_data:
        held = {cfg.eval_split: read_split(cfg.eval_data, cfg.eval_split)}
    elif is_file:
        n_eval = max(1, len(train_rows) // 10) if len(train_rows) > 1 else 0
        held = {"held-out": train_rows[len(train_rows) - n_eval:]}
        train_rows = train_rows[:len(train_rows) - n_eval]
    else:
        held = {cfg.eval_split: read_split(cfg.data, cfg.eval_split)}
    if not is_file or cfg.eval_data:
        for split in [s for s in cfg.final_eval_splits.split(",") if s]:
            held[split] = read_split(cfg.eval_data or cfg.data, split)
    n = cfg.limit or None
    train = tokenize_split(cfg, tokenizer, train_rows[:n], f"train [{cfg.train_split}]")
    held = {split: tokenize_split(cfg, tokenizer, rows[:n], f"eval [{split}]")
            for split, rows in held.items() if rows}
    if cfg.label_noise > 0:  # swap chosen and rejected in a seeded subset of the training pairs
        flipped = random.Random(cfg.seed).sample(range(len(train)),
                                                 round(cfg.label_noise * len(train)))
        for i in flipped:
            train[i] = {**train[i], "chosen": train[i]["rejected"],
                        "rejected": train[i]["chosen"]}
        print(f"label noise: swapped {len(flipped)} of {len(train)} training pairs")
    return train, held


def pairs_for_step(step, n, batch_size, seed):
    """Indices of the pairs of optimizer step `step`: epochs are seeded permutations, so the data
    position of a resumed run is a function of the step alone."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return out


def make_discriminators(cfg, d_model, device):
    """-> discs, their optimizer (None when frozen), their initial weights θ_D,0; all None when
    λ = 0: nothing adversarial is built, so the run is exactly the base loss."""
    if cfg.adv_weight == 0:
        return None, None, None
    discs = ganpo.build_discriminators(d_model, cfg).to(device)
    disc_init = {side: {n: p.detach().clone() for n, p in d.named_parameters()}
                 for side, d in discs.items()}
    # Adam moves a weight by at most ~lr per update, so this rate bounds how far they can get from
    # their random start: at the authors' ratio the 32 steps' rates sum to 4.6e-4, ~1.3% of the norm
    peak = disc_peak_lr(cfg)
    disc_opt = torch.optim.AdamW(discs.parameters(), lr=peak, weight_decay=0.01) if peak else None
    return discs, disc_opt, disc_init


def disc_peak_lr(cfg):
    return cfg.disc_lr if cfg.disc_lr is not None else cfg.lr * cfg.disc_lr_ratio


def make_players(cfg, policy, device):
    """The policy's optimizer and the discriminators with theirs: what checkpoint.pt holds."""
    trainable = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapters alone
    s = types.SimpleNamespace(policy=policy, ema={})
    s.policy_opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    d_model = scaleout.unwrap(policy).config.hidden_size
    s.discs, s.disc_opt, s.disc_start = make_discriminators(cfg, d_model, device)
    return s


def held_out_batches(cfg, held_out, micro, pad_id):
    """{last step?: {split: (batches, a cache of the reference's outputs)}}: periodic evaluations
    score --eval_pairs of the first held-out split, the last one every pair of every split."""
    first = list(held_out.items())[:1]
    return {False: {name: (loading.batches_of(ex[:cfg.eval_pairs or None], micro, pad_id), {})
                    for name, ex in first},
            True: {name: (loading.batches_of(ex, micro, pad_id), {})
                   for name, ex in held_out.items()}}


def start_run_folder(cfg, rank, warnings):
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rank == 0:  # eval.py reads run_config.json
        loading.write_text(os.path.join(cfg.output_dir, "run_config.json"),
                           json.dumps({**asdict(cfg), "warnings": warnings}, indent=1))


def read_saved_run(cfg, world):
    """--resume: -> (the saved run's config, its checkpoint); a new run: (cfg, None), and a folder
    that already holds a run is refused."""
    path = os.path.join(cfg.output_dir, "checkpoint.pt")
    if not cfg.resume:
        if os.path.exists(path):
            fail(f"--output_dir {cfg.output_dir} already holds a run: pass --resume to continue "
                 "it, or pick another folder")
        return cfg, None
    if not os.path.isfile(path):
        fail(f"--resume: no checkpoint.pt in --output_dir {cfg.output_dir}")
    try:
        state = loading.load_checkpoint(path)
    except ValueError as e:
        fail(str(e))
    if state.get("world_size", 1) != world:
        fail(f"--resume: the run in {cfg.output_dir} was saved on {state.get('world_size', 1)} "
             f"process(es); resume it on as many (torchrun --nproc_per_node), not {world}")
    given = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "output_dir")}
    saved = Config(**{**state["config"], "resume": True, "output_dir": cfg.output_dir})
    ignored = [k for k, v in given.items() if v != getattr(saved, k) and v != getattr(Config, k)]
    if ignored:
        print(f"--resume: the saved run's settings are used; ignoring --{', --'.join(ignored)}")
    return saved, state


def resume(cfg, state, s, rank, device):
    """Put every piece of saved state back that the next step depends on -> the next step."""
    start = restore(state, s, rank, device)
    if rank == 0:
        drop_records_after(cfg, start)
    print(f"resumed from step {start}")
    return start


def restore(state, s, rank, device):
    """Load checkpoint.pt's state into s and the RNGs -> its step."""
    scaleout.load_full_state_dicts(s.policy, s.policy_opt, state["policy"], state["policy_opt"])
    if s.discs is not None:
        s.discs.load_state_dict(state["discs"])
        s.disc_start = state["discs_init"]
    if s.disc_opt is not None:
        s.disc_opt.load_state_dict(state["disc_opt"])
    s.ema = {k: torch.tensor(v) for k, v in state["ema"].items()}
    rng = state["rng_ranks"][rank] if "rng_ranks" in state else state["rng"]  # torchrun: per rank
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if device == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


def save(cfg, s, step, tokenizer, rank, world, device):
    """checkpoint.pt (both players, their optimizers, the running means, RNG states) and the
    policy, each written whole or not at all."""
    policy_state, policy_opt_state = scaleout.full_state_dicts(s.policy, s.policy_opt)
    cuda_rng = torch.cuda.get_rng_state() if device == "cuda" else None
    rng = scaleout.gather_objects({"torch": torch.get_rng_state(), "python": random.getstate(),
                                   "cuda": cuda_rng})
    extra = {}
    if world > 1:  # torchrun: what every rank needs to resume, and proof that the replicas agree
        replicas = scaleout.gather_objects(scaleout.replica_fingerprint(s.discs, s.ema))
        extra = {"world_size": world, "rng_ranks": rng, "replicas": replicas}
        if any(r != replicas[0] for r in replicas):
            tqdm.write("warning: the ranks' discriminators or running means differ "
                       "(checkpoint.pt 'replicas')")
    if rank > 0:
        return
    checkpoint = {"step": step, "config": asdict(cfg), "policy": policy_state,
                  "policy_opt": policy_opt_state, "discs_init": s.disc_start,
                  "discs": s.discs.state_dict() if s.discs is not None else None,
                  "disc_opt": s.disc_opt.state_dict() if s.disc_opt is not None else None,
                  "ema": {k: float(v) for k, v in s.ema.items()}, "rng": rng[0], **extra}
    loading.write_atomically(os.path.join(cfg.output_dir, "checkpoint.pt"),
                             lambda tmp: torch.save(checkpoint, tmp))
    loading.save_policy(scaleout.unwrap(s.policy), tokenizer, cfg.output_dir,
                        policy_state if world > 1 else None)


# ------------------------------------------------------------------------------- what is printed

def eval_line(name, step, r, gan):
    adv = (f" | D auc real>fake {r['disc/auc_real_fake']:.3f} fake>contrast "
           f"{r['disc/auc_fake_contrast']:.3f}" if gan else "")
    return (f"eval {name} step {step} | loss {r['opo/loss']:.4f} | "
            f"acc {r['rewards/accuracies']:.3f} | margin {r['rewards/margins']:.3f} | "
            f"chosen {r['rewards/chosen']:.3f} | rejected {r['rewards/rejected']:.3f}{adv}")


def step_line(m, gan):
    adv = (f" | d_loss rf/ct {m['disc/real_fake_loss']:.3f}/{m['disc/contrast_loss']:.3f}"
           f" | d_acc rf/ct {m['disc/real_fake_acc']:.2f}/{m['disc/contrast_acc']:.2f}"
           f" | g_loss {m['gen/loss']:.3f} | dθ_D "
           f"{max(m['disc/chosen/weight_change'], m['disc/rejected/weight_change']):.1e}"
           if gan else "")
    return (f"step {m['step']} | loss {m['loss']:.4f} | acc {m['rewards/accuracies']:.2f} | "
            f"margin {m['rewards/margins']:.3f} | logps w/l {m['logps/chosen']:.1f}/"
            f"{m['logps/rejected']:.1f}{adv} | lr {m['lr']:.2e} | {m['step_time']:.2f}s | "
            f"{m['tokens_per_s']:.0f} tok/s")


def log(cfg, rank, record):
    if rank == 0:  # torchrun: rank 0 alone logs
        with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def drop_records_after(cfg, step):
    """A resumed run logs again what was logged after its checkpoint: drop those records."""
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    with open(path) as f:
        kept = [line for line in f if json.loads(line)["step"] < step]
    loading.write_text(path, "".join(kept))


def stop_on_signals():
    """Ctrl-C and SIGTERM finish the current step, save and exit cleanly."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signal.Signals(signum).name
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop


# ------------------------------------------------------------------------- the loop's pieces

def on(device, batch):
    return {k: v.to(device) for k, v in batch.items()}


def evaluate_held_out(cfg, s, ref, splits, step, autocast, rank, device):
    s.policy.eval()
    for name, (batches, ref_cache) in splits.items():
        r = ganpo.evaluate(s.policy, ref, [on(device, b) for b in batches], cfg, autocast,
                           discs=s.discs, ref_cache=ref_cache)
        pairs = sum(len(b["input_ids"]) // 2 for b in batches)
        log(cfg, rank, {"step": step, "split": name, "eval/pairs": pairs,
                        **{f"eval/{k}": v for k, v in r.items()}})
        tqdm.write(eval_line(name, step, r, s.discs is not None))
    s.policy.train()


def set_lr(cfg, s, step):
    """Warmup + cosine for both players, each to its own peak -> the policy's rate."""
    lr = get_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps)
    for group in s.policy_opt.param_groups:
        group["lr"] = lr
    for group in (s.disc_opt.param_groups if s.disc_opt else []):
        group["lr"] = get_lr(step, cfg.max_steps, disc_peak_lr(cfg), cfg.warmup_steps)
    return lr


def step_record(m, step, lr, dt, s, world, device):
    """ganpo_step's metrics + the step, times, memory and how far each D moved from its start."""
    if world > 1:  # torchrun: the figures of every rank's pairs, not this rank's share alone
        values = torch.tensor(list(m.values()), dtype=torch.float64, device=device)
        m = dict(zip(m, scaleout.mean_over_ranks(values).tolist()))
        m["tokens"] *= world
    m.update({"step": step, "lr": lr, "step_time": dt, "tokens_per_s": m["tokens"] / dt,
              "memory/peak_gib": scaleout.peak_memory_bytes(device) / 2 ** 30})
    for side in (("chosen", "rejected") if s.discs is not None else ()):
        m[f"disc/{side}/weight_change"] = ganpo.relative_change(s.discs[side], s.disc_start[side])
    return m


def stop_requested(stop, world, device):
    stopping = stop["signal"] is not None
    if world > 1:  # torchrun: all ranks stop after the same step, whichever got the signal
        stopping = bool(scaleout.mean_over_ranks(torch.tensor(float(stopping), device=device)))
    return stopping


# ------------------------------------------------------------------------------------------ main

def main():
    cfg = parse_config()
    rank, world, device = scaleout.start_distributed()  # one process: (0, 1, "cuda" or "cpu")
    if rank > 0:  # torchrun: rank 0 alone prints
        sys.stdout = open(os.devnull, "w")
        transformers.utils.logging.disable_progress_bar()
    cfg, saved = read_saved_run(cfg, world)
    use_bf16, autocast = scaleout.precision(device, cfg.dtype)
    cfg.dtype = "bf16" if use_bf16 else "fp32"  # what auto picked, for the record and a resume
    print(json.dumps(asdict(cfg)))
    warnings = settings_without_effect(cfg)  # kept in run_config.json too
    for line in warnings:
        print(f"warning: {line}")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    train, held_out = load_data(cfg, tokenizer)  # bad data fails here, before a model loads
    policy, ref = load_models(cfg, tokenizer, device, world, use_bf16)
    share = cfg.batch_size // world  # torchrun: the pairs of each step on this process
    micro, pad_id = share // cfg.grad_accum, tokenizer.pad_token_id
    evals = held_out_batches(cfg, held_out, micro, pad_id)
    s = make_players(cfg, policy, device)  # what checkpoint.pt holds
    start_run_folder(cfg, rank, warnings)
    start = resume(cfg, saved, s, rank, device) if saved else 0
    del saved
    gan, stop = s.discs is not None, stop_on_signals()

    # --- the loop: max_steps + 1 passes, so the last one evaluates and saves without training
    bar = tqdm(range(start, cfg.max_steps + 1), initial=start, total=cfg.max_steps + 1,
               desc="ganpo", dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        last = step == cfg.max_steps
        if last or (cfg.eval_every and step % cfg.eval_every == 0 and step > 0):
            evaluate_held_out(cfg, s, ref, evals[last], step, autocast, rank, device)
        if last:
            break

        # --- one optimizer step: warmup + cosine for both players, then ganpo.ganpo_step
        lr = set_lr(cfg, s, step)
        idx = pairs_for_step(step, len(train), cfg.batch_size, cfg.seed)
        idx = idx[rank * share:(rank + 1) * share]  # torchrun: this rank's share
        micro_batches = [on(device, loading.collate([train[i] for i in idx[j:j + micro]], pad_id))
                         for j in range(0, share, micro)]
        t0 = time.time()
        m = ganpo.ganpo_step(policy, ref, s.discs, s.policy_opt, s.disc_opt, micro_batches, cfg,
                             s.ema, autocast, cfg.max_grad_norm)
        m = step_record(m, step, lr, time.time() - t0, s, world, device)
        log(cfg, rank, m)
        if not math.isfinite(m["loss"]):
            fail(f"loss became {m['loss']} at step {step}; try a lower --lr or --dtype fp32 (last "
                 "checkpoint kept)")
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['rewards/accuracies']:.2f}")
        if step % cfg.log_every == 0:
            tqdm.write(step_line(m, gan))
        stopping = stop_requested(stop, world, device)
        if ((step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps) or stopping:
            save(cfg, s, step + 1, tokenizer, rank, world, device)
        if stopping:
            tqdm.write(f"{stop['signal'] or 'a signal'}: saved step {step + 1} to "
                       f"{cfg.output_dir}; continue with --resume")
            return
    save(cfg, s, cfg.max_steps, tokenizer, rank, world, device)
    finish(cfg, policy, tokenizer)


def finish(cfg, policy, tokenizer):
    if not cfg.lora_r:
        print(f"done: policy saved to {cfg.output_dir} "
              "(transformers.AutoModelForCausalLM.from_pretrained loads it)")
        return
    print(f"done: LoRA adapter saved to {cfg.output_dir} "
          "(peft.PeftModel.from_pretrained(base, folder) loads it)")
    if cfg.merge_lora:  # last of all: merging rewrites the policy's layers in place
        merged = os.path.join(cfg.output_dir, "merged")
        loading.save_policy(policy.merge_and_unload(), tokenizer, merged)
        print(f"merged model saved to {merged} "
              "(transformers.AutoModelForCausalLM.from_pretrained loads it)")


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
