"""Make the bundled preference data: short reviews sampled from SmolLM2, ranked by VADER sentiment.

    python data/make_data.py            # resumable; ~2 h on 2 CPU cores; writes data/{train,test,shift}.jsonl

Each prompt asks the packaged SmolLM2-135M-Instruct for a short review or description of something
in one topic category. We draw `--samples` completions at temperature 1, score each with VADER's
compound sentiment in [-1, 1], and keep the pair (highest = chosen, lowest = rejected) when the
gap is at least `--min_gap`. The ground-truth reward of the task is therefore "be positive".

Splits: `train` and `test` use the same 8 categories but disjoint prompts; `shift` uses 2 categories
that never appear in train. Every sample is appended to data/samples.jsonl as it is made, so an
interrupted run continues where it stopped; the split files are rebuilt from it at the end.
The same --seed on the same machine reproduces the files exactly (sampling is seeded per batch and
round of 4 samples, so asking for more samples later keeps the ones already drawn).
"""
import argparse
import itertools
import json
import os
import random
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import loading  # noqa: E402  (the model loader)

HERE = os.path.dirname(os.path.abspath(__file__))
PER_ROUND = 4  # completions per prompt in one generate() call

# category -> (adjectives, kinds): subjects are "a/an {adjective} {kind}"
CATEGORIES = {
    "restaurant": (["cozy", "busy", "family-run", "fancy", "cheap", "new", "old", "tiny", "rooftop", "seaside"],
                   ["Italian restaurant", "Thai restaurant", "Mexican restaurant", "sushi bar", "steakhouse",
                    "vegan cafe", "burger joint", "pizzeria", "Indian restaurant", "noodle shop", "diner", "bistro"]),
    "movie": (["recent", "classic", "low-budget", "blockbuster", "foreign", "animated", "long", "short", "indie", "cult"],
              ["science fiction movie", "horror film", "romantic comedy", "war drama", "action movie", "documentary",
               "musical", "thriller", "western", "fantasy film", "crime drama", "superhero movie"]),
    "book": (["thick", "short", "bestselling", "classic", "debut", "award-winning", "translated", "illustrated",
              "self-published", "popular"],
             ["mystery novel", "history book", "poetry collection", "biography", "cookbook", "fantasy novel",
              "self-help book", "travel memoir", "science book", "short story collection", "thriller novel",
              "children's book"]),
    "hotel": (["budget", "luxury", "boutique", "downtown", "beachfront", "mountain", "airport", "historic", "modern",
               "family"],
              ["hotel", "hostel", "bed and breakfast", "resort", "motel", "inn", "guesthouse", "lodge", "spa hotel",
               "apartment hotel", "ski chalet", "business hotel"]),
    "gadget": (["new", "cheap", "expensive", "refurbished", "lightweight", "waterproof", "wireless", "compact",
                "premium", "second-hand"],
               ["smartphone", "laptop", "tablet", "smartwatch", "pair of headphones", "camera", "e-reader",
                "bluetooth speaker", "fitness tracker", "robot vacuum", "drone", "gaming mouse"]),
    "video_game": (["new", "retro", "indie", "open-world", "multiplayer", "mobile", "story-driven", "free-to-play",
                    "hyped", "relaxing"],
                   ["racing game", "puzzle game", "role-playing game", "shooter", "platformer", "strategy game",
                    "sports game", "survival game", "fighting game", "farming game", "horror game", "card game"]),
    "music_album": (["debut", "live", "comeback", "acoustic", "experimental", "double", "long-awaited", "remastered",
                     "short", "collaborative"],
                    ["rock album", "jazz album", "pop album", "hip-hop album", "folk album", "classical recording",
                     "electronic album", "country album", "metal album", "soul album", "indie album", "soundtrack"]),
    "coffee_shop": (["tiny", "busy", "hipster", "corner", "chain", "quiet", "student", "roadside", "new", "old"],
                    ["coffee shop", "espresso bar", "tea house", "bakery cafe", "cat cafe", "bookshop cafe",
                     "juice bar", "donut shop", "brunch spot", "roastery", "kiosk", "dessert cafe"]),
    # shift-only categories: never seen in train or test
    "car": (["used", "new", "electric", "compact", "family", "rental", "sports", "hybrid", "vintage", "cheap"],
            ["sedan", "hatchback", "SUV", "pickup truck", "minivan", "convertible", "station wagon", "coupe",
             "city car", "crossover", "roadster", "camper van"]),
    "online_course": (["free", "paid", "beginner", "advanced", "short", "self-paced", "live", "university",
                       "week-long", "popular"],
                      ["programming course", "language course", "photography course", "cooking class",
                       "statistics course", "drawing course", "guitar course", "marketing course", "yoga class",
                       "history course", "writing workshop", "math course"]),
}
SHIFT = ["car", "online_course"]
TEMPLATES = ["Write a short review of {s}.", "Describe {s} you tried recently, in two sentences.",
             "Give a quick opinion of {s}.", "What did you think of {s}? Answer briefly.",
             "Write a two-sentence customer review of {s}."]


def article(phrase):
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def make_prompts(seed, n_train, n_test, n_shift):
    """Deterministic prompt list: [(id, split, category, text)], shuffled so any prefix mixes the splits."""
    rng = random.Random(seed)
    out = []
    for cat, (adjs, kinds) in CATEGORIES.items():
        texts = [t.format(s=article(f"{a} {k}")) for a, k, t in itertools.product(adjs, kinds, TEMPLATES)]
        rng.shuffle(texts)
        if cat in SHIFT:
            out += [("shift", cat, t) for t in texts[:n_shift]]
        else:  # disjoint prompts: the first n_test go to test, the next n_train to train
            out += [("test", cat, t) for t in texts[:n_test]] + [("train", cat, t) for t in texts[n_test:n_test + n_train]]
    rng.shuffle(out)
    return [(i, *row) for i, row in enumerate(out)]


def write_jsonl_atomic(path, rows):
    loading.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1234, help="seeds the prompt order and every sampling batch")
    p.add_argument("--train_per_cat", type=int, default=175, help="train prompts per in-distribution category")
    p.add_argument("--test_per_cat", type=int, default=35, help="test prompts per in-distribution category")
    p.add_argument("--shift_per_cat", type=int, default=140, help="prompts per shift category")
    p.add_argument("--samples", type=int, default=8, help=f"completions per prompt, drawn {PER_ROUND} at a time")
    p.add_argument("--max_new_tokens", type=int, default=48, help="length cap of each completion")
    p.add_argument("--batch_prompts", type=int, default=32, help="prompts per generate() call")
    p.add_argument("--min_gap", type=float, default=0.5, help="keep a pair when VADER(chosen) - VADER(rejected) >= this")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (a quick look)")
    args = p.parse_args()

    prompts = make_prompts(args.seed, args.train_per_cat, args.test_per_cat, args.shift_per_cat)[: args.limit]
    samples_path = os.path.join(HERE, "samples.jsonl")
    done = {}
    if os.path.exists(samples_path):
        with open(samples_path) as f:
            for line in f:
                if line.endswith("\n"):  # a line cut by a crash is resampled
                    r = json.loads(line)
                    done[r["id"]] = r
    folder = loading.smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"  # batched generation needs left padding
    # float32: on these CPUs bf16 generation is ~4x slower (no native bf16 matmul)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    analyzer = SentimentIntensityAnalyzer()
    batches = [prompts[i:i + args.batch_prompts] for i in range(0, len(prompts), args.batch_prompts)]
    rounds = -(-args.samples // PER_ROUND)
    for b, batch in enumerate(batches):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for _, _, _, t in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        for r in range(rounds):
            if all(i in done and len(done[i]["completions"]) >= (r + 1) * PER_ROUND for i, *_ in batch):
                continue
            # seeded per (batch, round): a resumed run, or one asking for more samples, draws the same ones
            torch.manual_seed(args.seed * 100_003 + b + 7_919 * r)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=args.max_new_tokens, num_return_sequences=PER_ROUND,
                                     pad_token_id=tokenizer.pad_token_id)
            completions = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
            with open(samples_path, "a") as f:  # a later line for the same id replaces the earlier one
                for j, (i, split, cat, text) in enumerate(batch):
                    outs = [c.strip() for c in completions[j * PER_ROUND:(j + 1) * PER_ROUND]]
                    prev = done[i] if i in done else {"completions": [], "scores": []}
                    row = {"id": i, "split": split, "category": cat, "prompt": text,
                           "completions": prev["completions"][:r * PER_ROUND] + outs,
                           "scores": prev["scores"][:r * PER_ROUND] + [analyzer.polarity_scores(c)["compound"] for c in outs]}
                    done[i] = row
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            print(f"batch {b + 1}/{len(batches)} | round {r + 1}/{rounds} ({PER_ROUND} samples per prompt)", flush=True)
    # one line per prompt from here on: rewrite the appended log compactly (atomically)
    write_jsonl_atomic(samples_path, [done[i] for i in sorted(done)])

    splits = {"train": [], "test": [], "shift": []}
    for i, split, cat, text in prompts:
        r = {k: (v[:args.samples] if k in ("completions", "scores") else v) for k, v in done[i].items()}
        hi = max(range(len(r["scores"])), key=lambda k: r["scores"][k])
        lo = min(range(len(r["scores"])), key=lambda k: r["scores"][k])
        if r["scores"][hi] - r["scores"][lo] < args.min_gap or not r["completions"][lo] or not r["completions"][hi]:
            continue
        splits[split].append({"prompt": [{"role": "user", "content": text}],
                              "chosen": [{"role": "assistant", "content": r["completions"][hi]}],
                              "rejected": [{"role": "assistant", "content": r["completions"][lo]}],
                              "score_chosen": r["scores"][hi], "score_rejected": r["scores"][lo],
                              "category": cat})
    kept = sum(len(rows) for rows in splits.values())
    print(f"{len(prompts)} prompts x {args.samples} samples -> {kept} pairs kept (gap >= {args.min_gap})")
    for split, rows in splits.items():
        write_jsonl_atomic(os.path.join(HERE, f"{split}.jsonl"), rows)
        n = max(len(rows), 1)
        gaps = sorted(r["score_chosen"] - r["score_rejected"] for r in rows)
        cats = {}
        for r in rows:
            cats[r["category"]] = cats.get(r["category"], 0) + 1
        print(f"{split}: {len(rows)} pairs | VADER chosen {sum(r['score_chosen'] for r in rows) / n:+.3f} "
              f"rejected {sum(r['score_rejected'] for r in rows) / n:+.3f} | gap mean {sum(gaps) / n:.3f} "
              f"median {gaps[len(gaps) // 2] if gaps else 0:.3f} | {dict(sorted(cats.items()))}")

if __name__ == "__main__":
    main()
