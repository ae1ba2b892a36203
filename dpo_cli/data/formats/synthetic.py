"""A built-in preference task that a tiny model learns in under a minute on a CPU.

Each prompt asks to sort a string of digits ("sort 3917:"). The chosen response is the digits in
ascending order (" 1379"). The rejected response, with equal odds, is either
- misordered: the same digits with two unequal ones swapped (" 1739"), or
- miscopied: still sorted, but one digit replaced by another (" 1369").
Both responses always have the same length. A misordered one can be spotted from the response
alone ("each digit is at least the previous one"); a miscopied one only by comparing the
response with the prompt, which a model has to learn to attend to. So the task is neither
solved by a length or vocabulary shortcut nor in a single step.
Evaluation pairs come from a separate random stream and never share a prompt with training, so
held-out accuracy measures whether the rules were learned, not memorised (chance is 0.5).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from dpo_cli.data.formats.base import Format
from dpo_cli.errors import DataError


def _misorder(ordered: list[str], rng: random.Random) -> list[str] | None:
    """The sorted digits with two unequal ones swapped: right digits, wrong order."""
    i, j = sorted(rng.sample(range(len(ordered)), 2))
    if ordered[i] == ordered[j]:  # swapping equal digits changes nothing: not a preference
        return None
    out = ordered[:]
    out[i], out[j] = out[j], out[i]
    return out


def _miscopy(ordered: list[str], rng: random.Random) -> list[str] | None:
    """The sorted digits with one replaced by another digit that keeps them sorted: right order,
    wrong digits. Telling this apart needs the prompt, not just the response."""
    k = rng.randrange(len(ordered))
    low = ordered[k - 1] if k > 0 else "0"
    high = ordered[k + 1] if k + 1 < len(ordered) else "9"
    options = [d for d in "0123456789" if low <= d <= high and d != ordered[k]]
    if not options:
        return None
    out = ordered[:]
    out[k] = rng.choice(options)
    return out


def make_pairs(
    n: int, seed: int, min_digits: int, max_digits: int, exclude: frozenset[str] = frozenset()
) -> list[dict[str, str]]:
    """`n` pairs {prompt, chosen, rejected} from a random stream fixed by `seed`, none of whose
    prompts is in `exclude`."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(100 * n + 10_000):  # bounded: a small prompt space may run out of new prompts
        if len(pairs) == n:
            break
        digits = [rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits))]
        if "".join(digits) in exclude:
            continue
        ordered = sorted(digits)
        rejected = _misorder(ordered, rng) if rng.random() < 0.5 else _miscopy(ordered, rng)
        if rejected is None:
            continue
        chosen, rejected = "".join(ordered), "".join(rejected)
        pairs.append({"prompt": f"sort {''.join(digits)}:", "chosen": f" {chosen}", "rejected": f" {rejected}"})
    if len(pairs) < n:
        raise DataError(
            f"data.format: could not draw {n} pairs with prompts unused in training (found {len(pairs)}); "
            "allow longer digit strings (data.format.max_digits) or fewer pairs"
        )
    return pairs


@dataclass
class Synthetic(Format):
    """The built-in sorting task, generated in memory (see the module docstring)."""

    num_train: int = 4096  # training pairs to generate
    num_eval: int = 256  # held-out pairs, none with a training prompt
    min_digits: int = 3  # shortest digit string to sort (>= 2)
    max_digits: int = 8  # longest digit string to sort

    name: ClassVar[str] = "synthetic"
    reads_rows: ClassVar[bool] = False

    def generate(self, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """Train and eval pairs from two seeds derived from `seed`; no eval prompt is a train prompt."""
        lengths = (self.min_digits, self.max_digits)
        train = make_pairs(self.num_train, seed, *lengths)
        seen = frozenset(p["prompt"][len("sort ") : -1] for p in train)
        evals = make_pairs(self.num_eval, seed + 1_000_003, *lengths, exclude=seen)
        return train, evals

    def problems(self) -> list[str]:
        out = [
            f"data.format.{key}={getattr(self, key)!r} must be > 0"
            for key in ("num_train", "num_eval")
            if getattr(self, key) is None or getattr(self, key) <= 0
        ]
        if not 2 <= self.min_digits <= self.max_digits:
            out.append(f"data.format needs 2 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        return out
