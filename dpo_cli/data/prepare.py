"""Config -> tokenized training and evaluation data: the whole data stage in one call, shared
by training and the preflight (`mode=inspect`), so that both see exactly the same examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpo_cli.data import UNPAIRED_FORMATS, Pairs, load_pairs
from dpo_cli.data.tokenize import Tokenized, TruncationStats, check_kept, tokenize_pairs


@dataclass
class Prepared:
    pairs: Pairs  # the normalized text pairs (or unpaired examples), and rows dropped when reading
    train: list[Tokenized]
    eval: list[Tokenized]
    train_stats: TruncationStats
    eval_stats: TruncationStats
    unit: str  # "pairs", or "examples" for unpaired data


def prepare(data: Any, tokenizer: Any, seed: int, check: bool = True) -> Prepared:
    """Read, normalize and tokenize `data` (the config's data section). With `check`, refuse
    data that is mostly degenerate (identical responses, before or after truncation), which
    would train at a constant loss; the preflight reports it instead."""
    pairs = load_pairs(data, seed)
    lengths = dict(
        max_length=data.max_length, max_prompt_length=data.max_prompt_length, truncation_mode=data.truncation_mode
    )
    train, train_stats = tokenize_pairs(pairs.train, tokenizer, **lengths)
    evals, eval_stats = tokenize_pairs(pairs.eval, tokenizer, **lengths)
    unit = "examples" if data.format in UNPAIRED_FORMATS else "pairs"
    if check:
        check_kept(len(pairs.train), train_stats, f"training {unit}")
    return Prepared(pairs, train, evals, train_stats, eval_stats, unit)
