"""How a prompt's judged samples become preference pairs (task=iterative, `iterative.pairs`).

A pair is (chosen, rejected): indices into one prompt's samples, the chosen one scored higher.
Ties are never pairs (the judge prefers neither), and a pair whose score gap is below
`min_gap` is dropped: a small gap under a noisy judge (a reward model) is as likely noise as
preference (Xiong et al. 2024 and Dong et al. 2024 pair the best and the worst of k samples;
Pace et al. 2024 study the gap). Identical responses score alike under any deterministic judge,
so they are ties too.

- best_worst: one pair per prompt, the highest score against the lowest (the first sample of
  each when several share it: deterministic);
- all: every two samples whose scores differ by at least min_gap (up to k(k-1)/2 per prompt).
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations

Pair = tuple[int, int]  # (chosen, rejected) sample indices


def best_worst(scores: list[float], min_gap: float) -> tuple[list[Pair], str | None]:
    """The best sample against the worst, or no pair and why (a tie, a gap below min_gap)."""
    if len(scores) < 2:
        return [], "tie"
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    gap = scores[best] - scores[worst]
    if gap <= 0:
        return [], "tie"
    if gap < min_gap:
        return [], "gap"
    return [(best, worst)], None


def all_pairs(scores: list[float], min_gap: float) -> tuple[list[Pair], str | None]:
    """Every two samples apart by a positive gap of at least min_gap, higher score first."""
    pairs = []
    for i, j in combinations(range(len(scores)), 2):
        hi, lo = (i, j) if scores[i] >= scores[j] else (j, i)
        gap = scores[hi] - scores[lo]
        if gap > 0 and gap >= min_gap:
            pairs.append((hi, lo))
    if pairs:
        return pairs, None
    return [], "tie" if max(scores, default=0) == min(scores, default=0) else "gap"


RULES = {"best_worst": best_worst, "all": all_pairs}


def make_pairs(scores: list[list[float]], rule: str, min_gap: float) -> tuple[list[list[Pair]], Counter]:
    """The pairs of each prompt's samples (`scores[p]`: one score per sample) under `rule`, and
    how many prompts gave none, by reason: "tie" (every sample scored the same) or "gap" (no
    two far enough apart)."""
    pairs, dropped = [], Counter()
    for prompt_scores in scores:
        found, why = RULES[rule](prompt_scores, min_gap)
        pairs.append(found)
        if why is not None:
            dropped[why] += 1
    return pairs, dropped
