#!/usr/bin/env python
"""Write a large preference-pairs JSONL file of random HH-style dialogues, for measuring the data
stage (tokenization, its cache, the preflight) at real size offline:

    python scripts/make_pairs.py --pairs 100000 --out /tmp/big.jsonl
    dpo-train mode=inspect data=pairs data.path=/tmp/big.jsonl data.cache_dir=/tmp/tokcache ...

Rows are {"prompt", "chosen", "rejected"}: a human turn of 20 to 80 words, responses of 20 to
120 words, drawn from a fixed vocabulary with a seeded generator (the same file every time).
"""

from __future__ import annotations

import argparse
import json
import random

WORDS = (
    "the model learns from preference pairs a prompt and two responses one preferred the other "
    "rejected policy reference reward margin beta loss gradient token sequence batch step epoch "
    "train evaluate dialogue summary answer question helpful harmless honest clear short long "
    "because however therefore example data set file line field value config key run directory"
).split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="rows to write")
    parser.add_argument("--out", default="/tmp/big.jsonl", help="output JSONL file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for _ in range(args.pairs):
            row = {
                "prompt": f"\n\nHuman: {sentence(rng, 20, 80)}\n\nAssistant:",
                "chosen": " " + sentence(rng, 20, 120),
                "rejected": " " + sentence(rng, 20, 120),
            }
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.pairs} pairs to {args.out}")


if __name__ == "__main__":
    main()
