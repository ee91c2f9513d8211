"""What the default run does not need: precision, memory readings, LoRA and torchrun.

On one CPU process without LoRA each piece here is off or does nothing, so a reader of the method
(ganpo.py) and of the loop (train.py) may skip this file. It imports nothing of the project.

torchrun --nproc_per_node N train.py ...: every rank runs the same script with the same seed (same
initial weights everywhere) and takes its share of each step's pairs, and
  - the policy and the reference are sharded with FSDP2 (`shard`); they are called through
    `ThroughForward`, because FSDP gathers a module's weights only around that module's forward;
  - the small discriminators are replicated: each rank keeps a whole copy, and their gradients are
    averaged before every step (`average_gradients`), so the copies stay identical;
  - the running means average the logits of every rank's pairs (`mean_over_ranks`);
  - held-out evaluation splits the batches over ranks (`share_of_batches`) and puts the figures
    together (`gather_over_ranks`).
LoRA: a 7-8B policy on one GPU trains low-rank adapters on a frozen base, and the base itself, with
the adapters switched off, is the reference (`AdaptersOff`): no second copy of the model exists.
"""
import hashlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn


# ---------------------------------------------------------------------------- precision, memory

def native_bf16(device):
    """Does this device multiply bf16 in hardware? A GPU: compute capability 8 or more (Ampere on;
    `including_emulation=False`, else a T4 says yes and runs bf16 emulated, slowly). A CPU:
    AVX512-BF16 or AMX units, the ones oneDNN uses for bf16 matmuls (torch.cpu's own probes)."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def precision(device, dtype):
    """-> (use_bf16, autocast): `dtype` auto | bf16 | fp32. Parameters stay float32 either way.

    auto = bf16 autocast where the device multiplies bf16 in hardware, GPU or CPU, float32
    elsewhere: there bf16 is emulated, ~100x slower on a CPU (`python bench.py --matmul`; bench.md
    measures both on the default model)."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and native_bf16(device))
    return use_bf16, lambda: torch.autocast(device_type=device, dtype=torch.bfloat16,
                                            enabled=use_bf16)


def enable_checkpointing(model):
    """Recompute each decoder layer's activations in the backward instead of keeping them
    (non-reentrant: works with frozen inputs and under autocast). transformers 5 renamed it."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def reset_peak_memory(device):
    """Start a new peak for peak_memory_bytes()."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak includes loading the model


def peak_memory_bytes(device):
    """Peak memory so far: allocated CUDA memory, or the resident set size of this process."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


# ------------------------------------------------------------------------------------------ LoRA

def add_lora(model, r, alpha, dropout, targets="all-linear"):
    """-> `model` with LoRA adapters (peft) on `targets` (all-linear = every linear layer of the
    decoder, not the LM head); only the adapters require grad. At step 0 the adapters add exactly
    0 (peft starts B at zero), so the rewards are 0."""
    try:
        import peft
    except ImportError:
        raise ValueError("--lora_r needs peft, which is not installed: pip install peft") from None
    targets = targets if targets == "all-linear" else [t for t in targets.split(",") if t]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def is_lora(model):
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class AdaptersOff(nn.Module):
    """π_ref under LoRA: the policy's own network with its adapters switched off, in eval mode (no
    LoRA dropout), without gradients. Its log-probs and its latents (the discriminators' "real"
    samples) both come from this forward, which runs `forward_fn` (ganpo.forward_logps_and_hidden).
    It holds the policy without registering it, so the reference owns no parameters."""

    def __init__(self, policy, forward_fn):
        super().__init__()
        object.__setattr__(self, "policy", policy)
        self.forward_fn = forward_fn

    def forward(self, batch, chunk_tokens=1024, temperature=1.0):
        training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter(), torch.no_grad():
                return self.forward_fn(self.policy, batch, chunk_tokens, temperature)
        finally:
            self.policy.train(training)


def load_adapter(base, folder):
    """A LoRA run's saved adapter on its base model, merged into a plain transformers model."""
    import peft
    return peft.PeftModel.from_pretrained(base, folder).merge_and_unload()


# -------------------------------------------------------------------------------------- torchrun

def start_distributed():
    """-> (rank, world size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in each
    process; without them (python train.py) nothing is initialised: (0, 1, "cuda" or "cpu")."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1 or dist.is_initialized():  # (the tests run several trainings in one process group)
        return (*rank_and_world(), device)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" then means this rank's GPU
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), world, device


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def mean_over_ranks(x):
    """The mean of a tensor over processes (the tensor itself on one process)."""
    if rank_and_world()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


class ThroughForward(nn.Module):
    """A causal LM as one module whose forward is forward_fn(model, ...), here
    ganpo.forward_logps_and_hidden. DDP synchronises and FSDP gathers weights only around a
    module's forward; calling the decoder and the LM head directly (as that function does) would
    bypass them: DDP would never average the gradients, FSDP would hand sharded weights to the
    LM head."""

    def __init__(self, model, forward_fn):
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, batch, chunk_tokens=1024, temperature=1.0):
        return self.forward_fn(self.model, batch, chunk_tokens, temperature)


def shard(model, bf16, forward_fn):
    """FSDP2: shard each decoder layer, then the rest (embeddings, final norm, LM head) with the
    root. bf16: compute in bf16, reduce gradients in float32 (GPUs). Policy and reference go
    through this alike, so they compute alike and the rewards are exactly 0 at step 0."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    wrapped = ThroughForward(model, forward_fn).train(model.training)
    fully_shard(wrapped, mp_policy=mp)
    return wrapped


def unwrap(model):
    """The transformers model inside ThroughForward (for save_pretrained, config)."""
    return model.model if isinstance(model, ThroughForward) else model


def sync_gradients(model, now):
    """FSDP2 reduces gradients in every backward unless told not to: with gradient accumulation
    only the last micro-batch of a step reduces (the others accumulate locally)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(now)


def average_gradients(module):
    """What DDP does for a replicated module, written out: average each gradient over ranks."""
    if rank_and_world()[1] == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            p.grad.copy_(mean_over_ranks(p.grad))


def clip_grad_norm(params, max_norm):
    """-> the gradients' norm before clipping to max_norm (0 = no clipping). Under FSDP2 the norm
    is a sharded DTensor: full_tensor() gathers it (on one process it is a plain tensor)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def share_of_batches(n):
    """-> [(batch index, is padding)] that this rank scores. Every rank runs as many forwards as
    the others (the collectives inside need it), so the last rank may repeat the last batch as
    padding. One process: every batch in order, none padding."""
    rank, world = rank_and_world()
    n_forwards = -(-n // world) * world
    return [(min(j, n - 1), j >= n) for j in range(rank, n_forwards, world)]


def gather_objects(obj):
    """[every rank's obj] (picklable), in rank order; [obj] on one process."""
    if rank_and_world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_over_ranks(sums, n, *lists):
    """Per-rank shares of an evaluation, put together: sums and counts added, lists of tensors
    joined in rank order."""
    if rank_and_world()[1] == 1:
        return (sums, n, *lists)
    device = next((t.device for d in lists for v in d.values() for t in v), "cpu")
    shares = gather_objects((sums, n, *[{k: [t.cpu() for t in v] for k, v in d.items()}
                                        for d in lists]))
    keys = {k for share in shares for k in share[0]}
    sums = {k: sum(share[0].get(k, 0.0) for share in shares) for k in keys}
    n = sum(share[1] for share in shares)
    joined = [{k: [t.to(device) for share in shares for t in share[2 + j][k]] for k in d}
              for j, d in enumerate(lists)]
    return (sums, n, *joined)


def full_state_dicts(model, optimizer):
    """-> (model, optimizer) state dicts with whole tensors, for checkpoint.pt. One process: the
    usual state_dict()s. FSDP2: every rank must call this; the shards are gathered onto rank 0's
    CPU (the other ranks get empty dicts), and the model's keys are the plain model's, so
    save_pretrained writes the same files as on one process. LoRA: the adapters' weights only."""
    if is_lora(model):  # the base never changes: the adapters are the whole trained state
        import peft
        return peft.get_peft_model_state_dict(model), optimizer.state_dict()
    if not isinstance(model, ThroughForward):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model.model, options=options)
    seen = set()  # a tied LM head: kept once, as state_dict() and save_pretrained do
    for name, p in model.model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            model_state.pop(name, None)
        seen.add(id(p))
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(model, optimizer, model_state, optimizer_state):
    """The inverse of full_state_dicts: every rank takes its shards of the whole tensors."""
    if is_lora(model):
        import peft
        peft.set_peft_model_state_dict(model, model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    if not isinstance(model, ThroughForward):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model.model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def replica_fingerprint(discs, ema):
    """What every rank must hold identically: a hash of the discriminators' weights and buffers,
    and the running means. train.py stores every rank's fingerprint in checkpoint.pt."""
    h = hashlib.sha256()
    for v in (discs.state_dict().values() if discs is not None else ()):
        h.update(v.detach().float().cpu().numpy().tobytes())
    return {"discs_sha256": h.hexdigest(), "ema": {k: float(v) for k, v in ema.items()}}
