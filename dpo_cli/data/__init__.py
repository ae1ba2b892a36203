"""Preference data: source rows -> {prompt, chosen, rejected} -> token ids -> batches.

Each step is its own module: a format module (`hh`, `synthetic`, ...) normalizes rows,
`tokenize` turns pairs into token ids with the truncation rules, `collate` pads them into
tensors, and `batching` decides which pairs each process sees at each step.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpo_cli.data import hh, kto, synthetic
from dpo_cli.errors import DataError

log = logging.getLogger(__name__)

Pair = dict[str, Any]  # {prompt, chosen, rejected} strings, or unpaired {prompt, completion, label}

# Row formats: name -> function turning one source row into a pair (None = drop the row).
# `synthetic` generates its pairs instead of reading rows.
FORMATS: dict[str, Callable[[dict], Pair | None] | None] = {
    "synthetic": None,
    "hh": hh.normalize,
    "kto": kto.normalize,
}
# Formats whose examples are unpaired completions with a desirable/undesirable label: only
# losses that do not need pairs (KTO, SFT) train on them.
UNPAIRED_FORMATS = frozenset({"kto"})


@dataclass
class Pairs:
    train: list[Pair]
    eval: list[Pair]
    dropped: dict[str, int] = field(default_factory=dict)  # split -> rows that could not be split


def _read_rows(path: str | None, hub_id: str | None, split: str, what: str) -> Any:
    """Rows from a local JSON-lines file (optionally .gz) or a hub dataset split."""
    import datasets

    from dpo_cli.hub import hub_reachable, offline_mode

    if path is not None:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise DataError(f"{what}={path!r}: no such file; point it at a .jsonl or .jsonl.gz file")
        try:
            return datasets.load_dataset("json", data_files=path, split="train")
        except Exception as e:  # noqa: BLE001 - any parse failure is a problem with that file
            raise DataError(f"{what}={path!r} could not be read as JSON lines: {e}") from None
    fix = (
        f"download it where there is network and set data.path=/path/to/{split}.jsonl.gz "
        "(or, if it is in your Hugging Face cache, set HF_HUB_OFFLINE=1)"
    )
    # In offline mode (HF_HUB_OFFLINE=1) the datasets library reads its cache, so try it;
    # otherwise an unreachable Hub would only be retried for half a minute, so fail now.
    if not offline_mode() and not hub_reachable():
        raise DataError(f"dataset {hub_id!r} cannot be downloaded: the Hugging Face Hub is not reachable; {fix}")
    try:
        return datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"dataset {hub_id!r} split {split!r} could not be loaded ({first}); {fix}") from None


def _normalize(rows: Any, normalize: Callable[[dict], Pair | None], what: str) -> tuple[list[Pair], int]:
    pairs, dropped = [], 0
    for i, row in enumerate(rows):
        try:
            pair = normalize(row)
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{what}: row {i} is not in the expected format ({type(e).__name__}: {e})") from None
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    return pairs, dropped


def _load_rows(data: Any, seed: int) -> tuple[list[Pair], list[Pair], dict[str, int]]:
    """Train and eval pairs, and dropped-row counts, of a format that reads rows."""
    normalize = FORMATS[data.format]
    assert normalize is not None
    rows = _read_rows(data.path, data.hub_id, data.train_split, "data.path")
    train, dropped_train = _normalize(rows, normalize, "data.path" if data.path else data.hub_id)
    dropped = {"train": dropped_train}
    if data.eval_path is not None or (data.path is None and data.eval_split is not None):
        rows = _read_rows(data.eval_path, data.hub_id, data.eval_split or "test", "data.eval_path")
        evals, dropped["eval"] = _normalize(rows, normalize, data.eval_path or data.hub_id)
    else:
        random.Random(seed).shuffle(train)
        n_eval = min(data.eval_holdout, len(train) // 2)
        train, evals = train[: len(train) - n_eval], train[len(train) - n_eval :]
    return train, evals, dropped


def load_pairs(data: Any, seed: int) -> Pairs:
    """Train and eval pairs for the `data` config section.

    Eval pairs come from `data.eval_path`, else the hub's `data.eval_split`, else the last
    `data.eval_holdout` pairs of a seeded shuffle of the training pairs (removed from training).
    `data.max_train_pairs` and `data.max_eval_pairs` then cap every format, synthetic included.
    """
    if data.format == "synthetic":
        train, evals = synthetic.load(data.synthetic, seed)
        dropped: dict[str, int] = {}
    else:
        train, evals, dropped = _load_rows(data, seed)
    if data.max_train_pairs is not None:
        train = train[: data.max_train_pairs]
    if data.max_eval_pairs is not None:
        evals = evals[: data.max_eval_pairs]
    if not train:
        raise DataError(f"no usable training pairs in {data.path or data.hub_id} (dropped: {dropped})")
    return Pairs(train=train, eval=evals, dropped=dropped)
