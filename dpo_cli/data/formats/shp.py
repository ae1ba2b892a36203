"""Stanford Human Preferences (SHP; Ethayarajh et al., 2022), one of the DPO paper's datasets.

Hub `stanfordnlp/SHP`. Each row is a Reddit post and two of its top-level comments: {"post_id",
"domain", "upvote_ratio", "history" (the post), "c_root_id_A", "c_root_id_B",
"created_at_utc_A", "created_at_utc_B", "score_A", "score_B", "human_ref_A", "human_ref_B"
(the comments), "labels" (1 = A preferred, 0 = B preferred), "seconds_difference",
"score_ratio"}.

Pairs are built as the DPO authors' code does (`get_shp` in eric-mitchell/direct-preference-
optimization, preference_datasets.py): the prompt is "\\n\\nHuman: " + history +
"\\n\\nAssistant:", each response is " " + the comment, chosen is A when labels == 1 and B
otherwise, and only pairs with max(score_A / score_B, score_B / score_A) >= 2 are kept (the
ratio is computed from the scores, not read from `score_ratio`, as that code does).

Beyond that code, rows are also dropped (with the reason) when a score is not positive (no ratio;
SHP's own scores are at least 2, and the DPO code would divide by zero), when `labels` is not 0
or 1, when a comment is empty, and when the two comments are identical.

The pair cap: the DPO code does not cap pairs per post (it keeps every pair with ratio >= 2,
grouped by prompt). The SHP dataset card recommends using no more than 5 preferences from each
post to prevent overfitting, since posts with many comments contribute many pairs; this module
follows the card, with a default of 5 (`data.format.max_pairs_per_post`; null = no cap, as the
DPO code). A row-by-row `normalize` cannot count, so it records the post under the private key
"_post_id", and `finalize` applies the cap over a whole split and removes that key.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as option
from typing import Any, ClassVar

from dpo_cli.data.fields import RowError, field, text_field
from dpo_cli.data.formats.base import Format

MIN_SCORE_RATIO = 2.0  # the DPO code's filter: the preferred comment scored at least twice the other
MAX_PAIRS_PER_POST = 5  # the SHP dataset card's recommendation (the DPO code keeps all)
POST_KEY = "_post_id"  # private: set by normalize, removed by finalize

LOW_RATIO = "score ratio below 2"
NOT_POSITIVE = "a score is not positive (no score ratio)"
BAD_LABEL = "labels is not 0 or 1"
EMPTY = "empty response"
IDENTICAL = "identical responses"


def _score(row: dict, name: str) -> float:
    value = field(row, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(name, f"field {name!r} must be a number, got {type(value).__name__} {value!r}"[:120])
    return value


def normalize(row: dict) -> dict[str, str] | str:
    """{prompt, chosen, rejected, _post_id} from one SHP row, or the reason it is dropped."""
    post_id, history = text_field(row, "post_id"), text_field(row, "history")
    a, b = text_field(row, "human_ref_A"), text_field(row, "human_ref_B")
    score_a, score_b = _score(row, "score_A"), _score(row, "score_B")
    label = field(row, "labels")
    if isinstance(label, bool) or not isinstance(label, int):
        raise RowError("labels", f"field 'labels' must be the integer 1 (A preferred) or 0, got {label!r}"[:120])
    if label not in (0, 1):
        return BAD_LABEL
    if score_a <= 0 or score_b <= 0:
        return NOT_POSITIVE
    if max(score_a / score_b, score_b / score_a) < MIN_SCORE_RATIO:
        return LOW_RATIO
    if not a.strip() or not b.strip():
        return EMPTY
    if a == b:
        return IDENTICAL
    chosen, rejected = (a, b) if label == 1 else (b, a)
    prompt = "\n\nHuman: " + history + "\n\nAssistant:"
    return {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected, POST_KEY: post_id}


def capped_reason(max_per_post: int) -> str:
    """The drop reason that `finalize`'s count stands for, for the report of dropped pairs."""
    return f"more than {max_per_post} pairs from one post (data.format.max_pairs_per_post)"


def finalize(pairs: list[dict[str, Any]], max_per_post: int | None) -> tuple[list[dict[str, Any]], int]:
    """Keep at most `max_per_post` pairs of each post, the first ones in the given order, and
    strip the private "_post_id" key from every pair; returns (pairs, number dropped).

    Call it on one split's pairs in source order, before any shuffle, hold-out or cap, so the
    pairs kept do not depend on the seed. `max_per_post=None` keeps every pair (the DPO code).
    """
    if max_per_post is not None and max_per_post < 1:
        raise ValueError(f"max_per_post must be at least 1 or None, got {max_per_post}")
    seen: dict[str, int] = {}
    kept: list[dict[str, Any]] = []
    for pair in pairs:
        post = pair[POST_KEY]
        seen[post] = seen.get(post, 0) + 1
        if max_per_post is None or seen[post] <= max_per_post:
            kept.append({k: v for k, v in pair.items() if k != POST_KEY})
    return kept, len(pairs) - len(kept)


@dataclass
class SHP(Format):
    """Stanford Human Preferences, paired as the DPO authors' code does, capped per post."""

    # source column of a field, e.g. data.format.columns.history=post (unset = the field's own name)
    columns: dict[str, str] = option(default_factory=dict)
    # keep at most this many pairs per post (first in file order; the SHP card's advice, the DPO
    # code has no cap); null = all
    max_pairs_per_post: int | None = MAX_PAIRS_PER_POST

    name: ClassVar[str] = "shp"
    fields: ClassVar[tuple[str, ...]] = (
        "post_id",
        "history",
        "human_ref_A",
        "human_ref_B",
        "score_A",
        "score_B",
        "labels",
    )
    hint: ClassVar[tuple[frozenset[str], str]] = (
        frozenset({"history", "human_ref_A", "human_ref_B"}),
        "these rows look like SHP: use data=shp",
    )

    def normalize(self, row: dict) -> dict[str, str] | str:
        return normalize(row)

    def finalize(self, examples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The cap on pairs per post (see `finalize`), with its drop reason."""
        kept, n = finalize(examples, self.max_pairs_per_post)
        return kept, ({capped_reason(self.max_pairs_per_post): n} if n else {})

    def problems(self) -> list[str]:
        out = super().problems()
        cap = self.max_pairs_per_post
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
            out.append(f"data.format.max_pairs_per_post={cap!r} must be > 0 (or null: no cap)")
        return out
