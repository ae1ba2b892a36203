"""A built-in preference task that a tiny model learns in a minute on a CPU.

Each prompt asks to sort a string of digits. The chosen response is the digits in ascending
order; the rejected response is that order with two unequal digits swapped, so it differs in
as few as two positions. The two responses have the same tokens and the same length, so neither
length nor vocabulary gives the answer away: the policy has to learn the rule "each digit is at
least the previous one" from the preferences.
Evaluation pairs come from a separate random stream, so held-out accuracy measures whether the
rule was learned, not whether pairs were memorised (chance is 0.5).
"""

from __future__ import annotations

import random


def make_pairs(
    n: int, seed: int, min_digits: int, max_digits: int, exclude: frozenset[str] = frozenset()
) -> list[dict[str, str]]:
    """`n` pairs {prompt, chosen, rejected} from a random stream fixed by `seed`, none of whose
    prompts is in `exclude`."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        digits = [rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits))]
        if "".join(digits) in exclude:
            continue
        ordered = sorted(digits)
        i, j = sorted(rng.sample(range(len(ordered)), 2))
        if ordered[i] == ordered[j]:  # swapping equal digits changes nothing: not a preference
            continue
        swapped = ordered[:]
        swapped[i], swapped[j] = swapped[j], swapped[i]
        chosen, rejected = "".join(ordered), "".join(swapped)
        pairs.append({"prompt": f"sort {''.join(digits)}:", "chosen": f" {chosen}", "rejected": f" {rejected}"})
    return pairs


def load(synthetic, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval pairs from two seeds derived from `seed`; no eval prompt is a train prompt."""
    lengths = (synthetic.min_digits, synthetic.max_digits)
    train = make_pairs(synthetic.num_train, seed, *lengths)
    seen = frozenset(p["prompt"][len("sort ") : -1] for p in train)
    evals = make_pairs(synthetic.num_eval, seed + 1_000_003, *lengths, exclude=seen)
    return train, evals
