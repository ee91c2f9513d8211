"""Benchmark one optimizer step of GANPO against plain DPO (adv_weight=0): time, tokens/s, memory.

    python bench.py                                   # SmolLM2-135M, 4 pairs x 256 tokens, fp32 on CPU
    python bench.py --gradient_checkpointing          # the same, recomputing decoder activations
    python bench.py --model tiny --vocab_size 151936 --batch_size 8 --max_length 512 --logits_chunk 0
    python bench.py --grad_accum 4 --batch_size 8      # 4 micro-batches a step, as train.py's --grad_accum
    python bench.py --json                            # ... and one JSON line of results at the end
    python bench.py --matmul                          # this machine's plain matmul rate, fp32 and bf16 autocast
    python bench.py --disc_attention_dropout 0        # what-if: discriminators without attention dropout

Both updates share one policy and reference and run in one process, interleaved after a warm-up
step each (DPO, GANPO, GANPO, DPO, ...), so a change in the machine's speed hits both alike; we
report the median seconds per step. The warm-up steps run under torch's FLOP counter, which gives
the ratio that arithmetic alone predicts; a plain matmul timed in the same precision tells how
close each update's arithmetic comes to the rate the hardware reaches at best. Peak memory is
measured for each update alone, in a fresh child process: memory that one update frees stays
with the allocator and would hide the other's peak. The batch is random token ids: P = max_length
/ 4 prompt tokens, then max_length - P completion tokens for chosen and for rejected, no padding.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import HfArgumentParser

import ganpo
import loading
import scaleout
from ganpo import option
from loading import fail


@dataclass
class BenchConfig:
    model: str = option("smollm2", "as train.py: smollm2 | tiny | HF id or folder")
    batch_size: int = option(4, "preference pairs per optimizer step")
    grad_accum: int = option(1, "micro-batches per optimizer step (divides batch_size), as train.py")
    max_length: int = option(256, "tokens per sequence (a quarter of them prompt)")
    steps: int = option(3, "timed steps per update, after one warm-up step each")
    dtype: str = option("auto", "auto (bf16 autocast on bf16 units, else fp32) | bf16 | fp32")
    gradient_checkpointing: bool = option(False, "recompute decoder activations in backward")
    adv_weight: float = option(1.0, "λ of the GANPO update (the other one is λ = 0: DPO)")
    disc_tokens: str = option("all", "tokens the discriminators see: all | response")
    disc_dim: int = option(512, "discriminator width")
    disc_layers: int = option(2, "discriminator transformer layers")
    disc_heads: int = option(8, "discriminator attention heads")
    disc_attention_dropout: float = option(-1.0, "what-if: discriminator attention dropout (-1 = "
                                                 "as trained, 0.1)")
    logits_chunk: int = option(1024, "completion tokens per LM-head chunk (0 = all at once)")
    lora_r: int = option(0, "LoRA rank (0 = full fine-tuning), as train.py; needs peft")
    lora_alpha: float = option(16.0, "LoRA alpha, as train.py")
    lora_dropout: float = option(0.05, "LoRA dropout, as train.py (it stores a copy of each "
                                       "adapter's input)")
    lora_targets: str = option("all-linear", "LoRA target modules, as train.py")
    vocab_size: int = option(0, "--model tiny only: vocabulary size (0 = the tokenizer's)")
    memory: bool = option(True, "measure peak memory in child processes (--no_memory skips)")
    peak_tflops: float = option(0.0, "GPU peak bf16 TFLOP/s for MFU (0 = look up by GPU name)")
    seed: int = option(0, "seeds the random batch and the discriminators")
    json: bool = option(False, "print one JSON line of results at the end")
    gpu_fit: bool = option(False, "print the estimated memory of common models on 24/80/141 GB "
                                  "GPUs and exit")
    gpus: str = option("", "--gpu_fit: also the memory per GPU with FSDP over these numbers of "
                           "GPUs (e.g. 4,8)")
    matmul: bool = option(False, "print this machine's matmul rate in fp32 and bf16 autocast and "
                                 "exit")
    only: str = option("", "internal: run dpo or ganpo alone and print its peak memory")


# dense bf16 peak of common GPUs, TFLOP/s (vendor datasheets, without sparsity)
GPU_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L40": 181, "A10G": 70, "A10": 125,
                   "L4": 121, "RTX 4090": 165, "RTX 3090": 71}

# decoder shapes for the FLOP prediction: layers, d_model, query width, key/value width, MLP width, vocabulary
# (from each model's config.json on the Hugging Face hub)
REFERENCE_MODELS = {"0.5B Qwen2.5-0.5B": (24, 896, 896, 128, 4864, 151936),
                    "1.7B SmolLM2-1.7B": (24, 2048, 2048, 2048, 8192, 49152),
                    "8B Llama-3.1-8B": (32, 4096, 4096, 1024, 14336, 128256)}
# more shapes for the memory estimate, with whether input and output embeddings are tied
FIT_MODELS = {"SmolLM2-135M": ((30, 576, 576, 192, 1536, 49152), True),
              "Gemma-2-2B": ((26, 2304, 2048, 1024, 9216, 256000), True),
              "Qwen2.5-0.5B": (REFERENCE_MODELS["0.5B Qwen2.5-0.5B"], True),
              "Qwen2.5-1.5B": ((28, 1536, 1536, 256, 8960, 151936), True),
              "SmolLM2-1.7B": (REFERENCE_MODELS["1.7B SmolLM2-1.7B"], True),
              "Llama-3.2-3B": ((28, 3072, 3072, 1024, 8192, 128256), True),
              "Qwen2.5-7B": ((28, 3584, 3584, 512, 18944, 152064), False),
              "Llama-3.1-8B": (REFERENCE_MODELS["8B Llama-3.1-8B"], False)}
GPUS_GIB = {"24 GB": 24e9 / 2 ** 30, "80 GB": 80e9 / 2 ** 30, "141 GB": 141e9 / 2 ** 30}


def shape_of(config):
    """The REFERENCE_MODELS tuple of a transformers Llama/Qwen/SmolLM-style config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return (config.num_hidden_layers, config.hidden_size, config.num_attention_heads * head_dim,
            kv_heads * head_dim, config.intermediate_size, config.vocab_size)


def step_flops(shape, pairs, T, P, disc_dim, disc_layers, disc_tokens="all", checkpointing=False,
               grad_accum=1):
    """-> (DPO step, what GANPO adds): matmul FLOPs of one optimizer step, a multiply-add = 2.

    A forward costs F per token; a backward 2F (input and weight gradients), 1F where only one of
    the two is needed. DPO: policy forward + backward (+ a second forward with checkpointing) and
    a reference forward; the LM head runs on completion tokens only, once more in the backward
    (its chunks are checkpointed). GANPO adds, in units of one discriminator forward over the 2B
    sequences: 3 forwards (real, fake, contrast for each of D_w and D_l) with their backward for
    the discriminator step (weight gradients and activation gradients, none into the inputs),
    then the generator's forward over the policy latents and its backward into them (no weight
    gradients): 3 + 3·2 + 1 + 1 = 11, less the input projection's missing input gradient. With
    grad_accum > 1 GANPO also runs the policy's forward twice (once without gradient before its
    discriminators step); DPO's step never does."""
    layers, d, q, kv, ffn, vocab = shape
    seqs, n_tokens, completion = 2 * pairs, 2 * pairs * T, 2 * pairs * (T - P)
    decoder = n_tokens * layers * (2 * (2 * d * q + 2 * d * kv + 3 * d * ffn) + 4 * T * q)  # + QKᵀ and AV
    head = completion * 2 * d * vocab
    dpo = (4 + checkpointing) * decoder + 5 * head  # policy 3 (+1) and reference 1; head 1 + 1 recompute + 2 + ref 1
    t_disc = T if disc_tokens == "all" else T - P
    per_token = 2 * 4 * disc_dim ** 2 + 2 * 2 * disc_dim * 4 * disc_dim + 4 * t_disc * disc_dim  # attention + MLP
    disc_fwd = seqs * t_disc * (2 * d * disc_dim + disc_layers * per_token)
    proj = seqs * t_disc * 2 * d * disc_dim
    return dpo, 11 * disc_fwd - 3 * proj + (decoder + head if grad_accum > 1 else 0)


def matmul_rate(device, autocast, n=2048, seconds=0.5, repeats=3):
    """FLOP/s of a plain (n x n) @ (n x n) matmul under `autocast` on this device: the best of
    `repeats` windows of about `seconds` each, the rate that a step's arithmetic could reach at best."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    rates = []
    with autocast():
        a @ b  # warm-up
        for _ in range(repeats):
            count, t0 = 0, time.perf_counter()
            while count == 0 or time.perf_counter() - t0 < seconds:
                a @ b
                if device == "cuda":
                    torch.cuda.synchronize()
                count += 1
            rates.append(2 * n ** 3 * count / (time.perf_counter() - t0))
    return max(rates)


def logp_agreement(policy, batch, autocast):
    """The batch's summed sequence log-probs under `autocast` against float32, before any step:
    -> {max_abs, mean_abs (nats per sequence), mean_abs_per_token, mean_logp (fp32)}."""
    with torch.no_grad():
        exact, n_tokens, _ = ganpo.forward_logps_and_hidden(policy, batch)
        with autocast():
            low, _, _ = ganpo.forward_logps_and_hidden(policy, batch)
    diff = (low.float() - exact).abs()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "mean_abs_per_token": (diff / n_tokens).mean().item(), "mean_logp": exact.mean().item()}


def random_examples(vocab_size, pairs, max_length, seed):
    """Tokenised pairs of random ids: max_length // 4 prompt tokens, the rest completion, no padding."""
    gen = torch.Generator().manual_seed(seed)
    P = max_length // 4

    def ids(n):
        return torch.randint(0, vocab_size, (n,), generator=gen).tolist()

    return [{"prompt": ids(P), "chosen": ids(max_length - P), "rejected": ids(max_length - P)} for _ in range(pairs)]


def setup(cfg, arms):
    """Models, optimizers, one random batch; -> (step(arm), info). Discriminators only if "ganpo" in arms."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    use_bf16, autocast = scaleout.precision(device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    try:
        tokenizer = loading.load_tokenizer(cfg.model)
        policy = loading.load_policy(cfg.model, tokenizer, cfg.seed, cfg.vocab_size or None,
                                   dtype=torch.bfloat16 if cfg.lora_r and use_bf16 else torch.float32).to(device)
        if cfg.lora_r:  # as train.py: adapters on a frozen base, the reference = the base (no copy)
            policy = scaleout.add_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    except ValueError as e:
        fail(str(e))
    ref = ganpo.make_reference(policy)  # LoRA: the base, adapters off
    if cfg.gradient_checkpointing:
        scaleout.enable_checkpointing(policy)
    policy.train()
    examples = random_examples(policy.config.vocab_size, cfg.batch_size, cfg.max_length, cfg.seed)
    P = len(examples[0]["prompt"])
    micro = cfg.batch_size // cfg.grad_accum
    micro_batches = [{k: v.to(device) for k, v in loading.collate(examples[i:i + micro],
                                                                 tokenizer.pad_token_id).items()}
                     for i in range(0, cfg.batch_size, micro)]
    batch = micro_batches[0]
    policy_opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)  # a real step
    discs, disc_opt = None, None
    if "ganpo" in arms:
        discs = ganpo.build_discriminators(policy.config.hidden_size, ganpo.GANPOConfig(
            disc_dim=cfg.disc_dim, disc_layers=cfg.disc_layers, disc_heads=cfg.disc_heads)).to(device)
        disc_opt = torch.optim.AdamW(discs.parameters(), lr=5e-7, weight_decay=0.01)
        if cfg.disc_attention_dropout >= 0:  # on CPU no fused attention kernel takes dropout: measure what it costs
            for layer in [layer for d in discs.values() for layer in d.encoder.layers]:
                layer.self_attn.dropout = cfg.disc_attention_dropout
    chunk = cfg.logits_chunk or 10 ** 12
    loss_cfgs = {"dpo": ganpo.GANPOConfig(adv_weight=0, logits_chunk=chunk),
                 "ganpo": ganpo.GANPOConfig(adv_weight=cfg.adv_weight, disc_tokens=cfg.disc_tokens,
                                            logits_chunk=chunk)}
    ema = {}
    agreement = logp_agreement(policy, batch, autocast) if use_bf16 else None

    def step(arm):
        gan = arm == "ganpo"
        ganpo.ganpo_step(policy, ref, discs if gan else None, policy_opt, disc_opt if gan else None, micro_batches,
                         loss_cfgs[arm], ema, autocast)
        if device == "cuda":
            torch.cuda.synchronize()

    info = {"model": cfg.model, "params": sum(p.numel() for p in policy.parameters()),
            "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
            "disc_params": sum(p.numel() for p in discs.parameters()) if discs is not None else 0,
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "precision": "bf16 autocast" if use_bf16 else "fp32", "shape": shape_of(policy.config),
            "tokens_per_step": 2 * cfg.batch_size * cfg.max_length, "prompt_tokens": P,
            "native_bf16": scaleout.native_bf16(device), "logp_vs_fp32": agreement}
    return step, device, info


def measure_alone(arm):
    """Peak memory of one update alone: a child process runs it and prints JSON."""
    args = [a for a in sys.argv[1:] if a != "--json"] + ["--only", arm, "--json"]
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"peak-memory child for {arm} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def n_params(shape, tied):
    layers, d, q, kv, ffn, vocab = shape
    return vocab * d * (1 if tied else 2) + layers * (2 * d * q + 2 * d * kv + 3 * d * ffn)


def memory_estimate(shape, tied, tokens, logits_chunk=1024, disc_dim=512, disc_layers=2):
    """Bytes for one GANPO micro-batch of `tokens` tokens, bf16 autocast + gradient checkpointing.

    Weights stay float32 (autocast keeps master weights), so the state is 20 bytes per parameter:
    policy weights 4 + gradients 4 + AdamW moments 8, and the frozen reference 4. Activations: the
    checkpoint keeps each layer's float32 input (4·L·d bytes per token), plus about 60·d + 8·ffn
    bytes per token for the layer being recomputed, the two models' last hidden states and their
    gradients; one LM-head chunk holds its logits in bf16 and float32 and their gradient (10·V bytes
    per row). Discriminators: 16 bytes per parameter. Fused GPU attention is assumed (no T² terms)."""
    return 20 * n_params(shape, tied) + working_memory(shape, tokens, logits_chunk, disc_dim, disc_layers)


def working_memory(shape, tokens, logits_chunk=1024, disc_dim=512, disc_layers=2):
    """Bytes of memory_estimate beyond the policy's and reference's state: activations, one LM-head
    chunk and the discriminators (the same with LoRA and, per GPU, with FSDP)."""
    layers, d, q, kv, ffn, vocab = shape
    acts = tokens * (4 * layers * d + 60 * d + 8 * ffn) + 10 * min(logits_chunk, tokens) * vocab
    disc = 2 * 16 * (d * disc_dim + disc_layers * 12 * disc_dim ** 2 + disc_dim ** 2)
    return acts + disc


def lora_params(shape, r):
    """LoRA on every linear layer of the decoder: r·(inputs + outputs) per layer, for q, k, v, o, gate, up, down."""
    layers, d, q, kv, ffn, vocab = shape
    return r * layers * (7 * d + 2 * q + 2 * kv + 3 * ffn)


def lora_memory_estimate(shape, tied, tokens, r, logits_chunk=1024, disc_dim=512, disc_layers=2):
    """Bytes for one GANPO micro-batch with LoRA (train.py --lora_r r on a bf16 GPU): the base in bf16 (2
    bytes per parameter), no reference copy (the reference is the base with the adapters off), the
    adapters in float32 with gradients and AdamW moments (16 bytes per adapter parameter), and the
    same activations and discriminators as memory_estimate."""
    return 2 * n_params(shape, tied) + 16 * lora_params(shape, r) + working_memory(shape, tokens, logits_chunk,
                                                                                    disc_dim, disc_layers)


def fsdp_memory_estimate(shape, tied, tokens, gpus, logits_chunk=1024, disc_dim=512, disc_layers=2):
    """Bytes per GPU with FSDP2 over `gpus` GPUs (torchrun train.py), bf16 compute + checkpointing, one
    micro-batch of `tokens` tokens on each GPU.

    Sharded: the 20 bytes per parameter of memory_estimate, divided by the number of GPUs. Gathered
    while in use: the embeddings and LM head (the root group, kept whole from forward to backward:
    2 bytes bf16 + 2 gradient + 4 for its float32 reduction, per parameter), and two decoder layers
    at a time (the one computing and the one prefetched: the same 8 bytes per parameter). Not sharded:
    the activations of this GPU's micro-batch and the replicated discriminators."""
    layers, d, q, kv, ffn, vocab = shape
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * ffn
    root = vocab * d * (1 if tied else 2)
    return (20 * n_params(shape, tied) / gpus + 8 * (root + 2 * per_layer)
            + working_memory(shape, tokens, logits_chunk, disc_dim, disc_layers))


def fits(total_gib):
    """'fits' or '-' under each GPU size of GPUS_GIB, keeping 1.5 GiB for the CUDA context and allocator slack."""
    return "  ".join(f"{'fits' if total_gib + 1.5 <= cap else '-':>6s}" for cap in GPUS_GIB.values())


def print_gpu_fit(pairs, T, gpus=(), lora_r=16):
    tokens = 2 * pairs * T
    print(f"Estimated memory of GANPO training, bf16 autocast + gradient checkpointing, one micro-batch of "
          f"{pairs} pairs x {T} tokens ({tokens} tokens); see memory_estimate() for the formula")
    gpu_heads = "  ".join(f"{g:>6s}" for g in GPUS_GIB)
    print(f"{'model':14s} {'params':>7s} {'state GiB':>9s} {'total GiB':>9s}  " + gpu_heads)
    for name, (shape, tied) in FIT_MODELS.items():
        total = memory_estimate(shape, tied, tokens) / 2 ** 30
        print(f"{name:14s} {n_params(shape, tied) / 1e9:6.2f}B {20 * n_params(shape, tied) / 2 ** 30:9.1f} "
              f"{total:9.1f}  {fits(total)}")
    print("(1.5 GiB is kept free for the CUDA context and allocator slack)")
    print(f"\nWith LoRA (--lora_r {lora_r}, every decoder linear layer): base weights in bf16, no reference copy; "
          f"see lora_memory_estimate()")
    print(f"{'model':14s} {'params':>7s} {'adapters':>8s} {'total GiB':>9s}  " + gpu_heads)
    for name, (shape, tied) in FIT_MODELS.items():
        total = lora_memory_estimate(shape, tied, tokens, lora_r) / 2 ** 30
        print(f"{name:14s} {n_params(shape, tied) / 1e9:6.2f}B {lora_params(shape, lora_r) / 1e6:7.1f}M {total:9.1f}  "
              f"{fits(total)}")
    if gpus:
        print(f"\nWith FSDP (torchrun train.py), GiB per GPU, each GPU a micro-batch of {pairs} pairs x {T} tokens; "
              f"see fsdp_memory_estimate()")
        print(f"{'model':14s} {'params':>7s}  " + "  ".join(f"{f'{n} GPU' + 's' * (n > 1):>8s}" for n in gpus)
              + "   fits on 80 GB GPUs")
        for name, (shape, tied) in FIT_MODELS.items():
            per_gpu = [fsdp_memory_estimate(shape, tied, tokens, n) / 2 ** 30 for n in gpus]
            on_80 = ", ".join(f"{n}" for n, g in zip(gpus, per_gpu) if g + 1.5 <= GPUS_GIB["80 GB"]) or "-"
            print(f"{name:14s} {n_params(shape, tied) / 1e9:6.2f}B  "
                  + "  ".join(f"{g:8.1f}" for g in per_gpu) + f"   {on_80}")


def main():
    cfg = HfArgumentParser(BenchConfig).parse_args_into_dataclasses()[0]
    if cfg.only not in ("", "dpo", "ganpo"):
        fail(f"--only {cfg.only}: expected dpo or ganpo")
    if cfg.adv_weight <= 0:
        fail(f"--adv_weight {cfg.adv_weight}: the GANPO update needs λ > 0 (the DPO update is always run)")
    if cfg.batch_size < 1 or cfg.max_length < 4 or cfg.steps < 1:
        fail("--batch_size and --steps must be >= 1, --max_length >= 4")
    if cfg.grad_accum < 1 or cfg.batch_size % cfg.grad_accum:
        fail(f"--batch_size {cfg.batch_size} must be a multiple of --grad_accum {cfg.grad_accum}")
    if cfg.vocab_size and cfg.model != "tiny":
        fail("--vocab_size works with --model tiny only")

    try:
        gpus = [int(n) for n in cfg.gpus.split(",") if n]
    except ValueError:
        fail(f"--gpus {cfg.gpus}: expected a comma list of numbers, e.g. 4,8")
    if any(n < 1 for n in gpus):
        fail(f"--gpus {cfg.gpus}: every number must be >= 1")
    if cfg.gpu_fit:
        return print_gpu_fit(cfg.batch_size, cfg.max_length, gpus, cfg.lora_r or 16)
    if cfg.matmul:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # bf16 only at 512: where there are no bf16 matrix units one 2048 x 2048 bf16 matmul takes minutes
        for dtype, n in (("fp32", 2048), ("fp32", 512), ("bf16", 512)):
            rate = matmul_rate(device, scaleout.precision(device, dtype)[1], n=n)
            print(f"{device} ({torch.get_num_threads()} threads): {n} x {n} matmul, "
                  f"{'bf16 autocast' if dtype == 'bf16' else 'fp32'}: {rate / 1e9:.2f} GFLOP/s")
        print(f"native bf16 units: {'yes' if scaleout.native_bf16(device) else 'no'}")
        return
    if cfg.only:  # child: one update alone; peak over a warm-up step (optimizer state appears) and one more
        step, device, _ = setup(cfg, [cfg.only])
        scaleout.reset_peak_memory(device)
        step(cfg.only)
        step(cfg.only)
        print(json.dumps({"peak_bytes": scaleout.peak_memory_bytes(device)}))
        return

    step, device, info = setup(cfg, ["dpo", "ganpo"])
    arms = ("dpo", "ganpo")
    rate = matmul_rate(device, scaleout.precision(device, cfg.dtype)[1])
    flops = {}
    for arm in arms:  # warm-up, counting FLOPs
        with FlopCounterMode(display=False) as counter:
            step(arm)
        flops[arm] = counter.get_total_flops()
    times = {arm: [] for arm in arms}
    for i in range(cfg.steps):
        for arm in (arms if i % 2 == 0 else arms[::-1]):
            t0 = time.perf_counter()
            step(arm)
            times[arm].append(time.perf_counter() - t0)
    peak = {arm: measure_alone(arm) for arm in arms} if cfg.memory else {}

    secs = {arm: statistics.median(times[arm]) for arm in arms}
    dpo_f, gan_f = step_flops(info["shape"], cfg.batch_size, cfg.max_length, info["prompt_tokens"], cfg.disc_dim,
                              cfg.disc_layers, cfg.disc_tokens, cfg.gradient_checkpointing, cfg.grad_accum)
    peak_tflops = cfg.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if k in info["device"]), 0)
    result = {**asdict(cfg), **info, "seconds": secs, "all_seconds": times, "flops": flops, "peak_bytes": peak,
              "tokens_per_s": {a: info["tokens_per_step"] / secs[a] for a in arms},
              "time_ratio": secs["ganpo"] / secs["dpo"],
              "flop_ratio_counted": flops["ganpo"] / flops["dpo"], "flop_ratio_formula": 1 + gan_f / dpo_f,
              "memory_ratio": peak["ganpo"] / peak["dpo"] if peak else None,
              "mfu": ({a: flops[a] / secs[a] / (peak_tflops * 1e12) for a in arms}
                      if device == "cuda" and peak_tflops else None),
              "matmul_flops_per_s": rate,
              # how close each update's arithmetic comes to a plain matmul's rate; "extra": what GANPO adds
              "efficiency": {**{a: flops[a] / secs[a] / rate for a in arms},
                             "extra": ((flops["ganpo"] - flops["dpo"]) / (secs["ganpo"] - secs["dpo"]) / rate
                                       if secs["ganpo"] > secs["dpo"] else None)},
              "predicted_ratio": {}}
    for name, shape in REFERENCE_MODELS.items():
        d, g = step_flops(shape, cfg.batch_size, cfg.max_length, info["prompt_tokens"], cfg.disc_dim, cfg.disc_layers,
                          cfg.disc_tokens, cfg.gradient_checkpointing, cfg.grad_accum)
        result["predicted_ratio"][name] = 1 + g / d

    lora = f", LoRA r={cfg.lora_r}: {info['trainable_params'] / 1e6:.2f}M trained" if cfg.lora_r else ""
    print(f"{cfg.model} ({info['params'] / 1e6:.1f}M params{lora}; discriminators {info['disc_params'] / 1e6:.1f}M) | "
          f"{cfg.batch_size} pairs x {cfg.max_length} tokens"
          f"{f' in {cfg.grad_accum} micro-batches' if cfg.grad_accum > 1 else ''} | {info['precision']} | {info['device']} | "
          f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'} | median of {cfg.steps} steps")
    for a in arms:
        mem = f" | peak memory {peak[a] / 2 ** 30:.2f} GiB" if peak else ""
        mfu = f" | MFU {result['mfu'][a]:.1%}" if result["mfu"] else ""
        print(f"{a:5s} {secs[a]:8.3f} s/step | {result['tokens_per_s'][a]:8.0f} tokens/s | "
              f"{flops[a] / 1e9:8.1f} GFLOP/step{mem}{mfu}")
    mem = f" | peak memory {result['memory_ratio']:.3f}" if peak else ""
    print(f"GANPO/DPO: time {result['time_ratio']:.3f}{mem} | FLOPs {result['flop_ratio_counted']:.3f} counted, "
          f"{result['flop_ratio_formula']:.3f} by step_flops()"
          + (" (a full fine-tuning formula)" if cfg.lora_r else ""))
    if info["logp_vs_fp32"]:
        a = info["logp_vs_fp32"]
        print(f"log-probs vs fp32 (same weights, step 0): |Δ| mean {a['mean_abs']:.3f}, max "
              f"{a['max_abs']:.3f} nats per sequence ({a['mean_abs_per_token']:.1e} per token; "
              f"mean log-prob {a['mean_logp']:.1f})")
    eff = {k: "n/a" if v is None else f"{v:.0%}" for k, v in result["efficiency"].items()}
    print(f"arithmetic rate vs a plain matmul here ({rate / 1e9:.1f} GFLOP/s): DPO {eff['dpo']}, "
          f"GANPO {eff['ganpo']}, what GANPO adds {eff['extra']}")
    print("FLOP-predicted GANPO/DPO time for the same batch: "
          + " | ".join(f"{k} {v:.3f}" for k, v in result["predicted_ratio"].items()))
    if cfg.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
