"""Train a causal LM with GANPO (or plain DPO/SimPO/IPO with --adv_weight 0).

    python train.py                                  # SmolLM2-135M on the bundled data, 2 CPU cores, ~14 min
    python train.py --model tiny --max_steps 5       # smoke test in seconds
    python train.py --help                           # every flag
    torchrun --standalone --nproc_per_node 2 train.py   # the same run on 2 processes (FSDP2, README "Several GPUs")

The loop follows SPEC §6: per optimizer step, each micro-batch gets one policy forward and one
reference forward, a discriminator backward on detached latents, and a policy backward through
the frozen discriminators; then both optimizers step (the discriminators --disc_steps times).

The authors' discriminator settings, as one set of flags:
    --disc_lr_ratio 0.5 --disc_steps 1 --disc_loss quad --disc_tokens all
Every step logs the discriminators' loss split into its real/fake and contrastive pairs, each
pair's ranking accuracy and each discriminator's weight change from its initial weights; every
held-out evaluation logs their AUC (README, "Is the discriminator game playing?").
"""
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import transformers
from tqdm import tqdm
from transformers import HfArgumentParser

import ganpo


@dataclass
class Config:
    # model and data
    model: str = field(default="smollm2", metadata={"help": "smollm2 (packaged, offline) | tiny (random, tests) | HF id or folder"})
    data: str = field(default="bundled", metadata={"help": "bundled (data/*.jsonl) | a .jsonl/.json file | a HF dataset name"})
    train_split: str = field(default="train", metadata={"help": "split to train on (for HF datasets and bundled data)"})
    eval_split: str = field(default="test", metadata={"help": "held-out split, evaluated every --eval_every steps and at the end"})
    eval_data: str = field(default="", metadata={"help": "held-out data, if not --data's --eval_split (a file: default = last 10%% of --data)"})
    final_eval_splits: str = field(default="", metadata={"help": "extra splits scored at the end, e.g. shift (comma list)"})
    eval_pairs: int = field(default=48, metadata={"help": "held-out pairs in each periodic evaluation (0 = all); the final one uses all"})
    output_dir: str = field(default="out/ganpo-smollm2", metadata={"help": "policy (save_pretrained), checkpoint.pt, metrics.jsonl"})
    max_length: int = field(default=128, metadata={"help": "tokens per sequence, prompt + completion"})
    max_prompt_length: int = field(default=64, metadata={"help": "prompt tokens kept (its end) before the completion is cut"})
    # optimisation
    max_steps: int = field(default=32, metadata={"help": "policy optimizer steps (0 = save the untrained policy)"})
    batch_size: int = field(default=8, metadata={"help": "preference pairs per optimizer step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (divides batch_size)"})
    lr: float = field(default=5e-5, metadata={"help": "peak policy learning rate (high: the default run is 32 steps)"})
    warmup_steps: int = field(default=3, metadata={"help": "linear warmup steps, then cosine decay to lr/10"})
    weight_decay: float = field(default=0.0, metadata={"help": "policy AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping for policy and discriminators (0 = off)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 autocast on a bf16 GPU, else fp32) | bf16 | fp32"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder activations in backward"})
    # LoRA (SPEC §10): adapters on a frozen base; the reference is the base with the adapters off
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = off: full fine-tuning); needs `pip install peft`"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator (the update is alpha/r · B·A)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch (off in the reference forward)"})
    lora_targets: str = field(default="all-linear", metadata={"help": "modules that get adapters: all-linear (every decoder linear layer) or a comma list, e.g. q_proj,v_proj"})
    merge_lora: bool = field(default=False, metadata={"help": "also save the base with the adapters merged in, to --output_dir/merged"})
    seed: int = field(default=0, metadata={"help": "seeds data order, label noise, discriminators, tiny model"})
    label_noise: float = field(default=0.0, metadata={"help": "fraction of training pairs with chosen/rejected swapped"})
    # objective (SPEC §3, §5)
    loss: str = field(default="dpo", metadata={"help": "base loss: dpo | simpo | ipo"})
    beta: float = field(default=0.1, metadata={"help": "β of DPO/IPO/SimPO"})
    gamma: float = field(default=0.5, metadata={"help": "γ, SimPO margin"})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε of conservative DPO"})
    adv_weight: float = field(default=1.0, metadata={"help": "λ of the generator loss (reference code: 1.0); 0 = plain OPO"})
    disc_tokens: str = field(default="all", metadata={"help": "tokens the discriminators see: all | response"})
    disc_dim: int = field(default=512, metadata={"help": "discriminator width (reference code: 512)"})
    disc_layers: int = field(default=2, metadata={"help": "discriminator transformer layers (reference code: 2)"})
    disc_heads: int = field(default=8, metadata={"help": "discriminator attention heads (reference code: 8)"})
    disc_dropout: float = field(default=0.1, metadata={"help": "discriminator dropout (reference code: 0.1)"})
    disc_lr: Optional[float] = field(default=None, metadata={"help": "peak discriminator lr, absolute (overrides --disc_lr_ratio); 0 = frozen discriminators"})
    disc_lr_ratio: float = field(default=0.5, metadata={"help": "peak discriminator lr / policy lr (reference code: 0.5); 0 = frozen"})
    disc_steps: int = field(default=1, metadata={"help": "discriminator updates per policy step on that step's latents (reference code: 1)"})
    disc_loss: str = field(default="quad", metadata={"help": "quad (reference code: real/fake + contrastive pair) | ragan (real/fake pair only)"})
    ema_decay: float = field(default=0.9, metadata={"help": "μ of the running means of discriminator logits"})
    # bookkeeping
    log_every: int = field(default=5, metadata={"help": "steps between log lines (metrics.jsonl gets every step)"})
    eval_every: int = field(default=15, metadata={"help": "steps between held-out evaluations (0 = only at the end)"})
    save_every: int = field(default=50, metadata={"help": "steps between checkpoints (always at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir exactly where it stopped"})


def fail(message):
    """One clear line and a non-zero exit, no traceback wall."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_config(cfg, world=1):
    if cfg.loss not in ("dpo", "simpo", "ipo"):
        fail(f"--loss {cfg.loss}: expected dpo, simpo or ipo")
    if cfg.disc_tokens not in ("all", "response"):
        fail(f"--disc_tokens {cfg.disc_tokens}: expected all or response")
    if cfg.disc_loss not in ("quad", "ragan"):
        fail(f"--disc_loss {cfg.disc_loss}: expected quad or ragan")
    if cfg.disc_steps < 1:
        fail(f"--disc_steps {cfg.disc_steps}: expected at least 1")
    if (cfg.disc_lr is not None and cfg.disc_lr < 0) or cfg.disc_lr_ratio < 0:
        fail("--disc_lr and --disc_lr_ratio must be >= 0 (0 = frozen discriminators)")
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        fail(f"--dtype {cfg.dtype}: expected auto, bf16 or fp32")
    if cfg.grad_accum < 1 or cfg.batch_size % (world * cfg.grad_accum):
        fail(f"--batch_size {cfg.batch_size} must be a multiple of --grad_accum {cfg.grad_accum}" if world == 1 else
             f"--batch_size {cfg.batch_size} must be a multiple of {world} processes x --grad_accum {cfg.grad_accum}")
    if not 0 <= cfg.disc_dropout < 1:
        fail(f"--disc_dropout {cfg.disc_dropout}: expected a fraction in [0, 1)")
    if not 0 <= cfg.label_noise <= 1:
        fail(f"--label_noise {cfg.label_noise}: expected a fraction in [0, 1]")
    if cfg.lora_r < 0 or not 0 <= cfg.lora_dropout < 1:
        fail("--lora_r must be >= 0 (0 = off) and --lora_dropout in [0, 1)")
    if cfg.lora_r and world > 1:
        fail("--lora_r with torchrun is not supported (LoRA is for one GPU here; FSDP for several)")
    if cfg.merge_lora and not cfg.lora_r:
        fail("--merge_lora needs --lora_r > 0")
    if cfg.max_steps < 0 or cfg.max_length < 2 or cfg.max_prompt_length < 1:
        fail("--max_steps must be >= 0, --max_length >= 2, --max_prompt_length >= 1")


def read_split(data, split):
    try:
        return ganpo.read_rows(data, split)
    except ValueError as e:
        fail(str(e))


def tokenize_split(cfg, tokenizer, rows, what):
    """Tokenise one split, say what was dropped, and fail with one line if nothing is left."""
    examples, dropped = ganpo.tokenize_rows(rows, tokenizer, cfg.max_length, cfg.max_prompt_length)
    merged = sum(e["boundary_merged"] for e in examples)
    print(f"{what}: {len(examples)} pairs"
          + (f" | {dropped} dropped: no completion tokens left after truncation to --max_length {cfg.max_length}" if dropped else "")
          + (f" | {merged} with a token merged across the prompt/completion boundary" if merged else ""))
    if not examples:
        fail(f"--data {cfg.data} ({what}): no pairs left after filtering (check --max_length / --max_prompt_length)")
    return examples


def load_data(cfg, tokenizer):
    """-> (train, {split name: held-out examples}); the first held-out split is evaluated periodically.
    A single file without --eval_data keeps its last 10% of rows out of training for evaluation."""
    is_file = cfg.data.endswith((".jsonl", ".json"))
    train_rows = read_split(cfg.data, cfg.train_split)
    if cfg.eval_data:
        held = {cfg.eval_split: read_split(cfg.eval_data, cfg.eval_split)}
    elif is_file:
        n_eval = max(1, len(train_rows) // 10) if len(train_rows) > 1 else 0
        train_rows, held = train_rows[:len(train_rows) - n_eval], {"held-out": train_rows[len(train_rows) - n_eval:]}
    else:
        held = {cfg.eval_split: read_split(cfg.data, cfg.eval_split)}
    if not is_file or cfg.eval_data:
        for s in [s for s in cfg.final_eval_splits.split(",") if s]:
            held[s] = read_split(cfg.eval_data or cfg.data, s)
    train = tokenize_split(cfg, tokenizer, train_rows, f"train [{cfg.train_split}]")
    held = {s: tokenize_split(cfg, tokenizer, rows, f"eval [{s}]") for s, rows in held.items() if rows}
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


def save_policy(policy, tokenizer, output_dir, state_dict=None):
    """save_pretrained into a temporary folder, then move each file into place (each move is atomic)."""
    tmp = os.path.join(output_dir, ".policy.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)


def atomic_torch_save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def main():
    cfg = HfArgumentParser(Config).parse_args_into_dataclasses()[0]
    check_config(cfg, world=int(os.environ.get("WORLD_SIZE", 1)))  # torchrun sets WORLD_SIZE
    rank, world, device = ganpo.start_distributed()  # one process: (0, 1, "cuda" or "cpu")
    if rank > 0:  # torchrun: rank 0 alone prints, logs and saves
        sys.stdout = open(os.devnull, "w")
        transformers.utils.logging.disable_progress_bar()
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            fail(f"--resume: no checkpoint.pt in --output_dir {cfg.output_dir}")
        try:
            state = ganpo.load_checkpoint(ckpt_path)
        except ValueError as e:
            fail(str(e))
        if state.get("world_size", 1) != world:
            fail(f"--resume: the run in {cfg.output_dir} was saved on {state.get('world_size', 1)} process(es); "
                 f"resume it on as many (torchrun --nproc_per_node), not {world}")
        given = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "output_dir")}
        cfg = Config(**{**state["config"], "resume": True, "output_dir": cfg.output_dir})
        ignored = [k for k, v in given.items() if v != getattr(cfg, k) and v != getattr(Config, k)]
        if ignored:
            print(f"--resume: the saved run's settings are used; ignoring --{', --'.join(ignored)}")
    elif os.path.exists(ckpt_path):
        fail(f"--output_dir {cfg.output_dir} already holds a run: pass --resume to continue it, or pick another folder")
    print(json.dumps(asdict(cfg)))

    # --- setup: precision, models, data (plumbing)
    use_bf16, autocast = ganpo.precision(device, cfg.dtype)  # bf16 autocast on bf16 GPUs, float32 on CPU

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        tokenizer = ganpo.load_tokenizer(cfg.model)
        # a LoRA base never meets an optimizer: on a bf16 GPU it is kept in bf16 (half the memory)
        policy = ganpo.load_policy(cfg.model, tokenizer, cfg.seed,
                                   dtype=torch.bfloat16 if cfg.lora_r and use_bf16 else torch.float32)
        if cfg.lora_r:
            policy = ganpo.add_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    except ValueError as e:
        fail(str(e))
    train, held_out = load_data(cfg, tokenizer)
    if cfg.label_noise > 0:  # swap chosen and rejected in a seeded subset of the training pairs
        flipped = random.Random(cfg.seed).sample(range(len(train)), round(cfg.label_noise * len(train)))
        for i in flipped:
            train[i] = {**train[i], "chosen": train[i]["rejected"], "rejected": train[i]["chosen"]}
        print(f"label noise: swapped {len(flipped)} of {len(train)} training pairs")
    share = cfg.batch_size // world  # pairs of each step on this process
    micro = share // cfg.grad_accum
    # periodic evaluations: the first held-out split's first --eval_pairs pairs (none if nothing is held out)
    periodic = {s: ganpo.batches_of(ex[:cfg.eval_pairs or None], micro, tokenizer.pad_token_id)
                for s, ex in list(held_out.items())[:1]}
    held_out = {s: ganpo.batches_of(ex, micro, tokenizer.pad_token_id) for s, ex in held_out.items()}
    ref_caches = {}  # (final?, split) -> {batch index: reference log-probs and latents}

    ref = ganpo.make_reference(policy)  # frozen copy of the initial policy (LoRA: the policy, adapters off)
    if cfg.gradient_checkpointing:
        ganpo.enable_checkpointing(policy)
    hidden_size = policy.config.hidden_size
    if world == 1:
        policy, ref = policy.to(device), ref.to(device)
    else:  # torchrun: FSDP2 shards both alike (and moves the shards to this rank's GPU)
        policy, ref = ganpo.shard(policy, use_bf16), ganpo.shard(ref, use_bf16)
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapters alone
    policy_opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Adam moves a weight by at most ~lr per update, so the discriminators' rate bounds how far they can
    # get from their random start: 2.5e-5 x 32 steps ~ 8e-4 at the reference code's ratio (SPEC §8)
    disc_peak_lr = cfg.disc_lr if cfg.disc_lr is not None else cfg.lr * cfg.disc_lr_ratio
    discs, disc_opt, disc_init = None, None, None
    if cfg.adv_weight > 0:  # with λ = 0 nothing adversarial is built, so the run is exactly the base loss
        discs = ganpo.build_discriminators(hidden_size, d_disc=cfg.disc_dim, n_layers=cfg.disc_layers,
                                           n_heads=cfg.disc_heads, dropout=cfg.disc_dropout).to(device)
        disc_init = {side: {n: p.detach().clone() for n, p in d.named_parameters()}  # θ_D,0, for the weight change
                     for side, d in discs.items()}
        if disc_peak_lr > 0:  # lr 0 = frozen: no optimizer at all, so not a bit of the networks moves
            disc_opt = torch.optim.AdamW(discs.parameters(), lr=disc_peak_lr, weight_decay=0.01)
    ema = {}
    loss_cfg = ganpo.LossConfig(loss=cfg.loss, beta=cfg.beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing,
                                adv_weight=cfg.adv_weight, disc_tokens=cfg.disc_tokens, disc_loss=cfg.disc_loss,
                                disc_steps=cfg.disc_steps, disc_frozen=disc_peak_lr == 0, ema_decay=cfg.ema_decay)

    # --- resume: every piece of state that the next step depends on
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.output_dir, "run_config.json"), "w") as f:  # eval.py reads it
            json.dump(asdict(cfg), f, indent=1)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start = 0
    if cfg.resume:
        ganpo.load_full_state_dicts(policy, policy_opt, state["policy"], state["policy_opt"])
        if discs is not None:
            discs.load_state_dict(state["discs"])
            disc_init = state["discs_init"]
        if disc_opt is not None:
            disc_opt.load_state_dict(state["disc_opt"])
        ema = {k: torch.tensor(v) for k, v in state["ema"].items()}
        rng = state["rng_ranks"][rank] if world > 1 else state["rng"]  # each rank's dropout draws are its own
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if device == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        start = state["step"]
        if rank == 0:  # drop metrics logged after the checkpoint (they will be logged again)
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] < start]
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(metrics_path + ".tmp", metrics_path)
        print(f"resumed from step {start}")
        del state

    def save(step):
        policy_state, policy_opt_state = ganpo.full_state_dicts(policy, policy_opt)  # torchrun: whole tensors, on rank 0
        rng = ganpo.gather_objects({"torch": torch.get_rng_state(), "python": random.getstate(),
                                    "cuda": torch.cuda.get_rng_state() if device == "cuda" else None})
        distributed = {}
        if world > 1:  # torchrun: what every rank needs to resume, and proof that the replicas agree
            distributed = {"world_size": world, "rng_ranks": rng,
                           "replicas": ganpo.gather_objects(ganpo.replica_fingerprint(discs, ema))}
            if any(r != distributed["replicas"][0] for r in distributed["replicas"]):
                tqdm.write("warning: the ranks' discriminators or running means differ (checkpoint.pt 'replicas')")
        if rank == 0:
            atomic_torch_save({"step": step, "config": asdict(cfg), "policy": policy_state,
                               "policy_opt": policy_opt_state,
                               "discs": discs.state_dict() if discs is not None else None, "discs_init": disc_init,
                               "disc_opt": disc_opt.state_dict() if disc_opt is not None else None,
                               "ema": {k: float(v) for k, v in ema.items()}, "rng": rng[0], **distributed},
                              ckpt_path)
            save_policy(ganpo.unwrap(policy), tokenizer, cfg.output_dir, policy_state if world > 1 else None)

    def log(record):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    stop = {"signal": None}

    def request_stop(signum, frame):  # finish the current step, save, exit cleanly
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # --- the loop: max_steps + 1 passes, so the last one evaluates and saves without training
    bar = tqdm(range(start, cfg.max_steps + 1), initial=start, total=cfg.max_steps + 1, desc="ganpo", dynamic_ncols=True,
               disable=rank > 0)
    for step in bar:
        last = step == cfg.max_steps
        if last or (cfg.eval_every and step % cfg.eval_every == 0 and step > 0):  # a resumed run evaluates where it stopped
            policy.eval()
            for name, batches in (held_out if last else periodic).items():
                batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
                result = ganpo.evaluate(policy, ref, batches, loss_cfg, autocast, ref_cache=ref_caches.setdefault((last, name), {}),
                                        discs=discs)
                log({"step": step, "split": name, **{f"eval/{k}": v for k, v in result.items()}})
                # the discriminators' held-out view: AUC 0.5 = they cannot tell policy from reference
                adv = (f" | D auc real>fake {result['disc/auc_real_fake']:.3f} fake>contrast "
                       f"{result['disc/auc_fake_contrast']:.3f}" if discs is not None else "")
                tqdm.write(f"eval {name} step {step} | loss {result['opo/loss']:.4f} | "
                           f"acc {result['rewards/accuracies']:.3f} | margin {result['rewards/margins']:.3f} | "
                           f"chosen {result['rewards/chosen']:.3f} | rejected {result['rewards/rejected']:.3f}{adv}")
            policy.train()
        if last:
            break

        # --- one optimizer step (SPEC §6): grad_accum micro-batches, then one step of each optimizer
        lr = ganpo.cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps)
        for group in policy_opt.param_groups:
            group["lr"] = lr
        if disc_opt is not None:  # same warmup and cosine schedule, its own peak
            for group in disc_opt.param_groups:
                group["lr"] = ganpo.cosine_lr(step, cfg.max_steps, disc_peak_lr, cfg.warmup_steps)
        idx = pairs_for_step(step, len(train), cfg.batch_size, cfg.seed)[rank * share:(rank + 1) * share]
        micro_batches = [{k: v.to(device) for k, v in ganpo.collate([train[i] for i in idx[j:j + micro]],
                                                                  tokenizer.pad_token_id).items()}
                         for j in range(0, share, micro)]
        t0 = time.time()
        m = ganpo.ganpo_step(policy, ref, discs, policy_opt, disc_opt, micro_batches, loss_cfg, ema, autocast,
                             cfg.max_grad_norm)
        dt = time.time() - t0
        if world > 1:  # torchrun: log the figures of every rank's pairs, not this rank's share alone
            m = dict(zip(m, ganpo.mean_over_ranks(torch.tensor(list(m.values()), dtype=torch.float64, device=device)).tolist()))
            m["tokens"] *= world
        m.update({"step": step, "lr": lr, "step_time": dt, "tokens_per_s": m["tokens"] / dt,
                  "memory/peak_gib": ganpo.peak_memory_bytes(device) / 2 ** 30})
        if discs is not None:  # ‖θ_D − θ_D,0‖ / ‖θ_D,0‖: has each discriminator left its random start?
            for side in ("chosen", "rejected"):
                m[f"disc/{side}/weight_change"] = ganpo.relative_change(discs[side], disc_init[side])
        log(m)
        if not math.isfinite(m["loss"]):
            fail(f"loss became {m['loss']} at step {step}; try a lower --lr or --dtype fp32 (last checkpoint kept)")
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['rewards/accuracies']:.2f}")
        if step % cfg.log_every == 0:
            adv = (f" | d_loss rf/ct {m['disc/real_fake_loss']:.3f}/{m['disc/contrast_loss']:.3f} | d_acc rf/ct "
                   f"{m['disc/real_fake_acc']:.2f}/{m['disc/contrast_acc']:.2f} | g_loss {m['gen/loss']:.3f} | "
                   f"dθ_D {max(m['disc/chosen/weight_change'], m['disc/rejected/weight_change']):.1e}") if discs else ""
            tqdm.write(f"step {step} | loss {m['loss']:.4f} | acc {m['rewards/accuracies']:.2f} | "
                       f"margin {m['rewards/margins']:.3f} | logps w/l {m['logps/chosen']:.1f}/{m['logps/rejected']:.1f}"
                       f"{adv} | lr {lr:.2e} | {dt:.2f}s | {m['tokens_per_s']:.0f} tok/s")
        stopping = stop["signal"] is not None
        if world > 1:  # torchrun: all ranks stop after the same step, whichever got the signal
            stopping = bool(ganpo.mean_over_ranks(torch.tensor(float(stopping), device=device)) > 0)
        if ((step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps) or stopping:
            save(step + 1)
        if stopping:
            tqdm.write(f"{stop['signal'] or 'a signal'}: saved step {step + 1} to {cfg.output_dir}; continue with --resume")
            return
    save(cfg.max_steps)
    if cfg.lora_r:
        print(f"done: LoRA adapter saved to {cfg.output_dir} (peft.PeftModel.from_pretrained(base, folder) loads it)")
        if cfg.merge_lora:  # last of all: merging rewrites the policy's layers in place
            save_policy(policy.merge_and_unload(), tokenizer, os.path.join(cfg.output_dir, "merged"))
            print(f"merged model saved to {os.path.join(cfg.output_dir, 'merged')} "
                  "(transformers.AutoModelForCausalLM.from_pretrained loads it)")
        return
    print(f"done: policy saved to {cfg.output_dir} (transformers.AutoModelForCausalLM.from_pretrained loads it)")


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
