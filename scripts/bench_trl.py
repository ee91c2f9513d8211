"""Time TRL's DPOTrainer step against ours (adv_weight=0): same model, batch, length and precision.

    python -m venv --system-site-packages /tmp/trlenv && /tmp/trlenv/bin/pip install --no-deps trl==1.16.0
    HF_HUB_OFFLINE=1 /tmp/trlenv/bin/python scripts/bench_trl.py          # SmolLM2-135M, 4 pairs x 256, fp32

TRL is not a project dependency; install it in a scratch environment only for this comparison.
One optimizer step is what TRL's Trainer loop does per batch: `training_step` (policy forward and
backward, reference forward), gradient clipping, AdamW step. Ours is `ganpo.ganpo_step` with λ = 0.
The two run strictly alternating (TRL, ours, TRL, ours, ...) after a warm-up step each, on the same
random token ids (bench.py's batch), collated by each library's own collator; we report the median
seconds per step with the spread, and the median of the per-pair ratios.

    HF_HUB_OFFLINE=1 /tmp/trlenv/bin/python scripts/bench_trl.py --steps 8
"""
import os
import statistics
import sys
import time

import torch
import trl
from datasets import Dataset
from transformers import HfArgumentParser
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ganpo  # noqa: E402
from bench import BenchConfig, random_examples, setup  # noqa: E402


def main():
    cfg = HfArgumentParser(BenchConfig).parse_args_into_dataclasses()[0]
    our_step, device, _ = setup(cfg, ["dpo"])  # bench.py's DPO update (λ = 0) on its random batch
    use_bf16, _ = ganpo.precision(device, cfg.dtype)
    tokenizer = ganpo.load_tokenizer(cfg.model)
    theirs = ganpo.load_policy(cfg.model, tokenizer, cfg.seed).to(device).train()
    examples = random_examples(theirs.config.vocab_size, cfg.batch_size, cfg.max_length, cfg.seed)  # the same ids

    args = DPOConfig(output_dir="/tmp/bench_trl", report_to=[], per_device_train_batch_size=cfg.batch_size,
                     learning_rate=1e-6, max_grad_norm=1.0, bf16=use_bf16, use_cpu=device == "cpu",
                     gradient_checkpointing=cfg.gradient_checkpointing, max_length=None,
                     gradient_checkpointing_kwargs={"use_reentrant": False})
    dummy = Dataset.from_list([{"prompt": "Hello.\n", "chosen": "Hi.", "rejected": "Go."}])  # TRL wants a dataset; we pass batches
    trainer = DPOTrainer(model=theirs, ref_model=ganpo.make_reference(theirs), args=args, train_dataset=dummy,
                         processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which we do not call
    trl_inputs = trainer.data_collator([{"prompt_ids": e["prompt"], "chosen_ids": e["chosen"],
                                         "rejected_ids": e["rejected"]} for e in examples])
    trl_inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in trl_inputs.items()}

    def trl_step():
        trainer.model.train()
        trainer.training_step(trainer.model, trl_inputs)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    steps = {"trl": trl_step, "ours": lambda: our_step("dpo")}
    times = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn()
    for i in range(cfg.steps):  # strictly alternating: TRL, ours, TRL, ours, ... so both see the same machine
        for name in steps:
            t0 = time.perf_counter()
            steps[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    print(f"trl {trl.__version__} | {cfg.model} | {cfg.batch_size} pairs x {cfg.max_length} tokens | "
          f"{'bf16 autocast' if use_bf16 else 'fp32'} | {cfg.steps} steps each, alternating")
    for k in steps:
        v = sorted(times[k])
        print(f"{k:5s} median {statistics.median(v):7.3f} s/step | min {v[0]:.3f} max {v[-1]:.3f} | "
              f"all: {', '.join(f'{t:.2f}' for t in times[k])}")
    ratios = sorted(o / t for o, t in zip(times["ours"], times["trl"]))  # each of our steps against the TRL step before it
    print(f"ours/TRL time per DPO step: median {statistics.median(ratios):.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}, "
          f"over {len(ratios)} adjacent pairs); ratio of medians "
          f"{statistics.median(times['ours']) / statistics.median(times['trl']):.3f}")


if __name__ == "__main__":
    main()
