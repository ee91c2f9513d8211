"""Check our tokenisation and summed log-probs against TRL's DPOTrainer (not a project dependency).

    python -m venv --system-site-packages /tmp/trlenv && /tmp/trlenv/bin/pip install --no-deps trl
    HF_HUB_OFFLINE=1 /tmp/trlenv/bin/python scripts/compare_trl.py

TRL computes the reference log-probs of its tokenised training set (precompute_ref_log_probs); with
policy == reference, ours must match them, row by row, for conversational and standard rows.
"""
import os
import sys

import torch
import trl
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ganpo  # noqa: E402
import loading  # noqa: E402

tokenizer = loading.load_tokenizer("tiny")
model = loading.load_policy("tiny", tokenizer, 0).eval()
rows = loading.read_rows("bundled", "test")[:12]
conversational = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
standard = [{"prompt": r["prompt"][0]["content"] + "\n", "chosen": r["chosen"][0]["content"],
             "rejected": r["rejected"][0]["content"]} for r in rows]
print(f"trl {trl.__version__}")
for name, data in [("conversational", conversational), ("standard", standard)]:
    args = DPOConfig(output_dir="/tmp/compare_trl", report_to=[], precompute_ref_log_probs=True, max_length=None,
                     per_device_train_batch_size=4, use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=model, ref_model=ganpo.make_reference(model), args=args,
                         train_dataset=Dataset.from_list(data), processing_class=tokenizer)
    theirs = trainer.train_dataset
    ours, _ = loading.tokenize_rows([dict(d) for d in data], tokenizer, 10**6, 10**6)
    same_ids = all(o["prompt"] == t["prompt_ids"] and o["chosen"] == t["chosen_ids"]
                   and o["rejected"] == t["rejected_ids"] for o, t in zip(ours, theirs))
    with torch.no_grad():
        logps, _, _ = ganpo.forward_logps_and_hidden(model, loading.collate(ours, tokenizer.pad_token_id))
    B = len(ours)
    diff = max((logps[:B] - torch.tensor(theirs["ref_chosen_logps"])).abs().max().item(),
               (logps[B:] - torch.tensor(theirs["ref_rejected_logps"])).abs().max().item())
    print(f"{name}: {B} rows | same token ids: {same_ids} | max |summed log-prob difference| {diff:.2e} "
          f"(values around {logps.mean().item():.0f})")
