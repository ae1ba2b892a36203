"""Preference data: source rows -> {prompt, chosen, rejected} -> token ids -> batches.

Each step is its own module: a format module (`hh`, `synthetic`, ...) normalizes rows,
`tokenize` turns pairs into token ids with the truncation rules, `collate` pads them into
tensors, and `batching` decides which pairs each process sees at each step.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from dpo_cli.data import hh, kto, pairs, shp, synthetic, tldr, ultrafeedback
from dpo_cli.data.fields import RowError
from dpo_cli.data.sources import has_split, read_rows_with_origin
from dpo_cli.errors import DataError
from dpo_cli.hub import hub_reachable, offline_mode, offline_setting
from dpo_cli.schema import source_config

log = logging.getLogger(__name__)

# {prompt, chosen, rejected}, or unpaired {prompt, completion, label}; fields are strings or
# lists of {role, content} messages (rendered with the chat template before tokenizing, after
# which a pair carries "templated": True).
Pair = dict[str, Any]

# Row formats: name -> function turning one source row into a pair, or the reason it is dropped.
# `synthetic` generates its pairs instead of reading rows.
FORMATS: dict[str, Callable[[dict], Pair | str] | None] = {
    "synthetic": None,
    "mix": None,
    "hh": hh.normalize,
    "pairs": pairs.normalize,
    "tldr": tldr.normalize,
    "shp": shp.normalize,
    "ultrafeedback": ultrafeedback.normalize,
    "kto": kto.normalize,
}
# The fields each row format reads (after data.columns): a row that lacks several is told all.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "hh": ("chosen", "rejected"),
    "pairs": ("chosen", "rejected"),
    "tldr": ("info", "summaries", "choice"),
    "shp": ("post_id", "history", "human_ref_A", "human_ref_B", "score_A", "score_B", "labels"),
    "ultrafeedback": ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
    "kto": ("prompt", "completion", "label"),
}
# Formats whose examples are unpaired completions with a desirable/undesirable label: only
# losses that do not need pairs (KTO, SFT) train on them.
UNPAIRED_FORMATS = frozenset({"kto"})
# Settings a mixture applies to all its sources (tokenization happens once, on the mixed pairs).
MIX_WIDE = ("max_length", "max_prompt_length", "truncation_mode", "chat_template", "cache_dir")


def unpaired_data(d: Any) -> bool:
    """Whether the data section yields unpaired (KTO) examples."""
    if d.format == "mix":
        return any(
            isinstance(s, (dict, DictConfig)) and s.get("format") in UNPAIRED_FORMATS for s in (d.mixture or {}).values()
        )
    return d.format in UNPAIRED_FORMATS


@dataclass
class Pairs:
    train: list[Pair]
    eval: list[Pair]
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> reason -> rows dropped
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows read (none for generated data)
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)  # mixture source -> (train, eval) kept


def _read_rows(
    path: str | None, hub_id: str | None, split: str, what: str, hub: dict[str, Any] | None = None
) -> tuple[Any, list[str] | None]:
    """Rows from local files (see `sources`), with where each comes from ("'a.jsonl' line 7"),
    or a hub dataset split (where = None: its 1-based row numbers)."""
    if path is not None:
        origins = read_rows_with_origin(path, what, split)
        return [o.row for o in origins], [o.where() for o in origins]
    import datasets  # here: it takes a second to import, and only hub datasets need it

    fix = f"download it where there is network and set data.path=/path/to/{split}.jsonl.gz"
    if offline_setting():
        fix = f"{offline_setting()} is set: only the local Hugging Face cache is read, and it does not hold it; {fix}"
    else:
        fix += " (or, if it is in your Hugging Face cache, set HF_HUB_OFFLINE=1)"
    # In offline mode (HF_HUB_OFFLINE=1) the datasets library reads its cache, so try it;
    # otherwise an unreachable Hub would only be retried for half a minute, so fail now.
    if not offline_mode() and not hub_reachable():
        raise DataError(f"dataset {hub_id!r} cannot be downloaded: the Hugging Face Hub is not reachable; {fix}")
    try:
        return datasets.load_dataset(hub_id, split=split, **(hub or {})), None
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"dataset {hub_id!r} split {split!r} could not be loaded ({first}); {fix}") from None


def _mapped(row: dict, columns: dict[str, str]) -> dict:
    """The row with its columns renamed to the format's names (data.columns: name -> column)."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    out.update({name: row[col] for name, col in columns.items() if col in row})
    return out


def _normalize(
    source: tuple[Any, list[str] | None], fmt: str, columns: dict[str, str], what: str
) -> tuple[list[Pair], dict[str, int]]:
    """Pairs from rows of format `fmt`, and how many rows were dropped for each reason. A row
    that lacks fields or holds the wrong type is a DataError naming the row (file and line, or
    1-based row) and the fields (every missing one)."""
    normalize = FORMATS[fmt]
    assert normalize is not None
    rows, wheres = source
    pairs, dropped = [], Counter()
    for i, row in enumerate(rows):
        mapped = _mapped(dict(row), columns)
        try:
            pair = normalize(mapped)
        except RowError as e:
            where = f"{what}: {wheres[i]}" if wheres else f"{what} row {i + 1}"
            missing = [f for f in REQUIRED_FIELDS.get(fmt, ()) if f not in mapped] if e.field not in mapped else []
            if len(missing) > 1:
                names = ", ".join(map(repr, missing[:-1])) + f" and {missing[-1]!r}"
                has = ", ".join(map(str, mapped)) or "nothing"
                maps = " ".join(f"data.columns.{f}=COLUMN" for f in missing)
                raise DataError(
                    f"{where}: fields {names} are missing (the row has: {has}); fix the data, or map other columns "
                    f"with {maps}"
                ) from None
            raise DataError(
                f"{where}: {e}; fix the data, or map another column with data.columns.{e.field}=COLUMN"
            ) from None
        if isinstance(pair, str):
            dropped[pair] += 1
        else:
            pairs.append(pair)
    return pairs, dict(dropped)


def _load_rows(data: Any, seed: int) -> tuple[list[Pair], list[Pair], dict[str, dict[str, int]], list[dict], dict]:
    """Train and eval pairs, dropped-row counts per reason, the first training rows (for
    suggesting a format when nothing could be used), and rows read per split, of a format that
    reads rows."""
    columns = {k: v for k, v in dict(getattr(data, "columns", None) or {}).items() if v is not None}
    hub = {"name": getattr(data, "hub_config", None), "data_dir": getattr(data, "hub_data_dir", None)}
    hub = {k: v for k, v in hub.items() if v is not None}
    source = _read_rows(data.path, data.hub_id, data.train_split, "data.path", hub)
    sample = [dict(r) for r in itertools.islice(source[0], 3)]
    where = "data.path" if data.path else f"dataset {data.hub_id!r}"
    train, dropped_train = _normalize(source, data.format, columns, where)
    train = _finalize(data, train, dropped_train)
    dropped = {"train": dropped_train}
    rows = {"train": len(source[0])}
    # Eval rows: data.eval_path; else the eval split of the hub dataset or of a directory whose
    # files are named by split; else a seeded hold-out of the training pairs.
    split_dir = data.path is not None and data.eval_split is not None and has_split(data.path, data.eval_split)
    if data.eval_path is not None or (data.path is None and data.eval_split is not None) or split_dir:
        eval_path, key = (data.eval_path, "data.eval_path") if data.eval_path is not None else (data.path, "data.path")
        source = _read_rows(eval_path, data.hub_id, data.eval_split or "test", key, hub)
        where = key if eval_path else f"dataset {data.hub_id!r}"
        evals, dropped["eval"] = _normalize(source, data.format, columns, where)
        evals = _finalize(data, evals, dropped["eval"])
        rows["eval"] = len(source[0])
        if not evals:  # asked for explicitly, so an empty one is a mistake, not "no evaluation"
            raise DataError(
                f"no usable eval pairs in {where} (dropped: {_describe(dropped['eval'])}); fix the eval data, "
                "or set data.eval_path=null and data.eval_holdout=N to hold pairs out of training"
            )
    else:
        random.Random(seed).shuffle(train)
        holdout = data.eval_holdout  # a count, or below 1 a share of the pairs
        n_eval = min(int(holdout) if holdout >= 1 else round(holdout * len(train)), len(train) // 2)
        train, evals = train[: len(train) - n_eval], train[len(train) - n_eval :]
    return train, evals, dropped, sample, rows


def _finalize(data: Any, items: list[Pair], dropped: dict[str, int]) -> list[Pair]:
    """Per-split steps a row-by-row normalize cannot do: SHP's cap on pairs per post."""
    if data.format != "shp":
        return items
    cap = getattr(data, "shp_max_pairs_per_post", None)
    items, n = shp.finalize(items, cap)
    if n:
        dropped[shp.capped_reason(cap)] = n
    return items


def _cap(items: list[Pair], n: int | None, seed: int) -> list[Pair]:
    """At most n items, drawn at random (seeded) and kept in their order: sources are often
    sorted (a hub dataset concatenates its subsets), so the first n would be one subset."""
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


# (columns, format, hint): the format that rows with those columns fit, first match first.
FORMAT_HINTS = (
    ({"info", "summaries", "choice"}, "tldr", "these rows look like TL;DR comparisons: use data=tldr"),
    (
        {"score_chosen", "score_rejected", "chosen", "rejected"},
        "ultrafeedback",
        "these rows look like UltraFeedback (binarized): use data=ultrafeedback",
    ),
    ({"history", "human_ref_A", "human_ref_B"}, "shp", "these rows look like SHP: use data=shp"),
    ({"prompt", "completion", "label"}, "kto", "these rows look like unpaired examples: use data=kto with loss=kto"),
    (
        {"chosen", "rejected"},
        "pairs",
        "these rows hold chosen/rejected texts: use data=pairs (explicit or implicit prompt)",
    ),
)


def _suggest_format(sample: list[dict], current: str) -> str:
    """A hint at the data format that fits rows that could not be used; none when that is the
    `current` format (the reasons the rows were dropped then say what is wrong with them)."""
    keys = set().union(*(r.keys() for r in sample)) if sample else set()
    for columns, fmt, hint in FORMAT_HINTS:
        if columns <= keys:
            return f"; {hint}" if fmt != current else ""
    if keys:
        return f"; the rows have columns {', '.join(sorted(map(str, keys)))}: map them with data.columns.NAME=COLUMN"
    return ""


def _describe(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} rows: {reason}" for reason, n in dropped.items()) or "no rows"


def _load_mixture(data: Any, seed: int) -> Pairs:
    """data.format=mix: each source of data.mixture loaded as on its own (its holdout and caps),
    then data.weights[name] (default 1.0) of its training pairs kept (a seeded sample), as
    alignment-handbook's dataset mixer weights them; eval pairs are kept whole. Counts are
    reported per source."""
    weights = dict(getattr(data, "weights", None) or {})
    out = Pairs(train=[], eval=[])
    origin: dict[int, str] = {}  # id(pair) -> source, to count each source after the caps
    for i, (name, raw) in enumerate(data.mixture.items()):
        source = source_config(raw)
        ignored = [k for k in MIX_WIDE if source.get(k) != data.get(k)]
        if ignored:
            log.warning(
                "data.mixture.%s sets %s; the mixture's own data.%s apply to every source",
                name,
                ", ".join(f"{k}={source.get(k)}" for k in ignored),
                ", data.".join(ignored),
            )
        part = load_pairs(source, seed + i)
        train = _cap(part.train, max(1, round(weights.get(name, 1.0) * len(part.train))), seed + i)
        out.train += train
        out.eval += part.eval
        origin.update({id(p): name for p in train + part.eval})
        out.dropped.update({f"{name}/{split}": d for split, d in part.dropped.items()})
        out.rows.update({f"{name}/{split}": n for split, n in part.rows.items()})
    out.train = _cap(out.train, data.max_train_pairs, seed)
    out.eval = _cap(out.eval, data.max_eval_pairs, seed + 1)
    for name in data.mixture:
        out.sources[name] = (
            sum(origin[id(p)] == name for p in out.train),
            sum(origin[id(p)] == name for p in out.eval),
        )
    return out


def load_pairs(data: Any, seed: int) -> Pairs:
    """Train and eval pairs for the `data` config section.

    Eval pairs come from `data.eval_path`, else the hub's `data.eval_split`, else the last
    `data.eval_holdout` pairs (a count, or below 1 a share) of a seeded shuffle of the training
    pairs (removed from training).
    `data.max_train_pairs` and `data.max_eval_pairs` then cap every format, synthetic included,
    with a seeded random sample.
    """
    if data.format == "mix":
        return _load_mixture(data, seed)
    sample: list[dict] = []
    rows: dict[str, int] = {}
    if data.format == "synthetic":
        train, evals = synthetic.load(data.synthetic, seed)
        dropped: dict[str, dict[str, int]] = {}
    else:
        train, evals, dropped, sample, rows = _load_rows(data, seed)
    train = _cap(train, data.max_train_pairs, seed)
    evals = _cap(evals, data.max_eval_pairs, seed + 1)
    if not train:
        source = f"data.path={data.path!r}" if data.path else f"dataset {data.hub_id!r}"
        hint = _suggest_format(sample, data.format) if sample else ""
        raise DataError(
            f"no usable training pairs in {source} for data.format={data.format} "
            f"(dropped: {_describe(dropped.get('train', {}))}){hint}"
        )
    return Pairs(train=train, eval=evals, dropped=dropped, rows=rows)
