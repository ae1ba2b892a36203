"""Preference data: source rows -> {prompt, chosen, rejected} -> token ids -> batches.

Each step is its own module: a format (`formats/`: one module per format, e.g. `formats/hh.py`)
normalizes rows, `tokenize` turns pairs into token ids with the truncation rules, `collate`
pads them into tensors, and `batching` decides which pairs each process sees at each step.
The loader here works through the format interface (`formats.base.Format`) only; a mixture
(`data.mixture`) combines sources, each loaded as a data section of its own.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dpo_cli.data.fields import RowError
from dpo_cli.data.formats import Format, hints, make_format
from dpo_cli.data.options import MIX_WIDE, DataConfig, SourceConfig, is_mixture
from dpo_cli.data.sources import has_split, read_rows_with_origin
from dpo_cli.errors import ConfigError, DataError
from dpo_cli.hub import hub_reachable, offline_mode, offline_setting

log = logging.getLogger(__name__)

# {prompt, chosen, rejected}, or unpaired {prompt, completion, label}; fields are strings or
# lists of {role, content} messages (rendered with the chat template before tokenizing, after
# which a pair carries "templated": True).
Pair = dict[str, Any]


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
    """The row with its columns renamed to the format's names (data.format.columns: name -> column)."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    out.update({name: row[col] for name, col in columns.items() if col in row})
    return out


def _row_error(e: RowError, fmt: Format, mapped: dict, where: str) -> DataError:
    """A DataError for a row the format cannot read: every missing field it needs when several
    are, with the columns to map them from."""
    missing = [f for f in fmt.fields if f not in mapped] if e.field not in mapped else []
    if len(missing) > 1:
        names = ", ".join(map(repr, missing[:-1])) + f" and {missing[-1]!r}"
        has = ", ".join(map(str, mapped)) or "nothing"
        maps = " ".join(f"data.format.columns.{f}=COLUMN" for f in missing)
        return DataError(
            f"{where}: fields {names} are missing (the row has: {has}); fix the data, or map other columns with {maps}"
        )
    return DataError(f"{where}: {e}; fix the data, or map another column with data.format.columns.{e.field}=COLUMN")


def _normalize(source: tuple[Any, list[str] | None], fmt: Format, what: str) -> tuple[list[Pair], dict[str, int]]:
    """Examples from rows of format `fmt`, and how many rows were dropped for each reason. A row
    that lacks fields or holds the wrong type is a DataError naming the row (file and line, or
    1-based row) and the fields (every missing one)."""
    columns = fmt.column_map()
    rows, wheres = source
    pairs, dropped = [], Counter()
    for i, row in enumerate(rows):
        mapped = _mapped(dict(row), columns)
        try:
            pair = fmt.normalize(mapped)
        except RowError as e:
            where = f"{what}: {wheres[i]}" if wheres else f"{what} row {i + 1}"
            raise _row_error(e, fmt, mapped, where) from None
        if isinstance(pair, str):
            dropped[pair] += 1
        else:
            pairs.append(pair)
    return pairs, dict(dropped)


def _read_split(
    data: SourceConfig, fmt: Format, path: str | None, split: str, key: str
) -> tuple[list[Pair], dict[str, int], Any]:
    """One split's examples (finalized), drop counts, and the rows read."""
    hub = {"name": data.hub_config, "data_dir": data.hub_data_dir}
    source = _read_rows(path, data.hub_id, split, key, {k: v for k, v in hub.items() if v is not None})
    where = key if path is not None else f"dataset {data.hub_id!r}"
    examples, dropped = _normalize(source, fmt, where)
    examples, more = fmt.finalize(examples)
    dropped.update(more)
    return examples, dropped, source[0]


def _load_rows(
    data: SourceConfig, fmt: Format, seed: int
) -> tuple[list[Pair], list[Pair], dict[str, dict[str, int]], list[dict], dict]:
    """Train and eval pairs, dropped-row counts per reason, the first training rows (for
    suggesting a format when nothing could be used), and rows read per split, of a format that
    reads rows."""
    train, dropped_train, rows_train = _read_split(data, fmt, data.path, data.train_split, "data.path")
    sample = [dict(r) for r in itertools.islice(rows_train, 3)]
    dropped = {"train": dropped_train}
    rows = {"train": len(rows_train)}
    # Eval rows: data.eval_path; else the eval split of the hub dataset or of a directory whose
    # files are named by split; else a seeded hold-out of the training pairs.
    split_dir = data.path is not None and data.eval_split is not None and has_split(data.path, data.eval_split)
    if data.eval_path is not None or (data.path is None and data.eval_split is not None) or split_dir:
        eval_path, key = (data.eval_path, "data.eval_path") if data.eval_path is not None else (data.path, "data.path")
        evals, dropped["eval"], rows_eval = _read_split(data, fmt, eval_path, data.eval_split or "test", key)
        rows["eval"] = len(rows_eval)
        if not evals:  # asked for explicitly, so an empty one is a mistake, not "no evaluation"
            where = key if eval_path else f"dataset {data.hub_id!r}"
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


def _cap(items: list[Pair], n: int | None, seed: int) -> list[Pair]:
    """At most n items, drawn at random (seeded) and kept in their order: sources are often
    sorted (a hub dataset concatenates its subsets), so the first n would be one subset."""
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _suggest_format(sample: list[dict], current: Format) -> str:
    """A hint at the data format that fits rows that could not be used (the formats' own
    hints, most specific first); none when that is the `current` format (the reasons the rows
    were dropped then say what is wrong with them)."""
    keys = set().union(*(r.keys() for r in sample)) if sample else set()
    for columns, cls, hint in hints():
        if columns <= keys:
            return f"; {hint}" if not isinstance(current, cls) else ""
    if keys:
        return f"; the rows have columns {', '.join(sorted(map(str, keys)))}: map them with data.format.columns.NAME=COLUMN"
    return ""


def _describe(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} rows: {reason}" for reason, n in dropped.items()) or "no rows"


def _warn_mix_wide(data: DataConfig, name: str, source: SourceConfig) -> None:
    ignored = [k for k in MIX_WIDE if getattr(source, k) != getattr(data, k)]
    if ignored:
        log.warning(
            "data.mixture.%s sets %s; the mixture's own data.%s apply to every source",
            name,
            ", ".join(f"{k}={getattr(source, k)}" for k in ignored),
            ", data.".join(ignored),
        )


def _load_mixture(data: DataConfig, seed: int) -> Pairs:
    """A mixture: each source of data.mixture loaded as on its own (its holdout and caps),
    then data.weights[name] (default 1.0) of its training pairs kept (a seeded sample), as
    alignment-handbook's dataset mixer weights them; eval pairs are kept whole. Counts are
    reported per source."""
    weights = dict(data.weights or {})
    out = Pairs(train=[], eval=[])
    origin: dict[int, str] = {}  # id(pair) -> source, to count each source after the caps
    mixture = data.mixture or {}
    for i, (name, source) in enumerate(mixture.items()):
        _warn_mix_wide(data, name, source)
        part = load_pairs(source, seed + i)
        train = _cap(part.train, max(1, round(weights.get(name, 1.0) * len(part.train))), seed + i)
        out.train += train
        out.eval += part.eval
        origin.update({id(p): name for p in train + part.eval})
        out.dropped.update({f"{name}/{split}": d for split, d in part.dropped.items()})
        out.rows.update({f"{name}/{split}": n for split, n in part.rows.items()})
    out.train = _cap(out.train, data.max_train_pairs, seed)
    out.eval = _cap(out.eval, data.max_eval_pairs, seed + 1)
    for name in mixture:
        out.sources[name] = (
            sum(origin[id(p)] == name for p in out.train),
            sum(origin[id(p)] == name for p in out.eval),
        )
    return out


def data_format(data: SourceConfig) -> Format:
    """The format object of a data section (ConfigError naming data.format when it is none)."""
    try:
        return make_format(data.format)
    except ValueError as e:
        raise ConfigError([str(e)]) from None


def load_pairs(data: SourceConfig, seed: int) -> Pairs:
    """Train and eval pairs for the `data` config section.

    Eval pairs come from `data.eval_path`, else the hub's `data.eval_split`, else the last
    `data.eval_holdout` pairs (a count, or below 1 a share) of a seeded shuffle of the training
    pairs (removed from training).
    `data.max_train_pairs` and `data.max_eval_pairs` then cap every format, generated ones
    included, with a seeded random sample.
    """
    if is_mixture(data):
        return _load_mixture(data, seed)
    fmt = data_format(data)
    sample: list[dict] = []
    rows: dict[str, int] = {}
    if fmt.reads_rows:
        train, evals, dropped, sample, rows = _load_rows(data, fmt, seed)
    else:
        train, evals = fmt.generate(seed)
        dropped: dict[str, dict[str, int]] = {}
    train = _cap(train, data.max_train_pairs, seed)
    evals = _cap(evals, data.max_eval_pairs, seed + 1)
    if not train:
        source = f"data.path={data.path!r}" if data.path else f"dataset {data.hub_id!r}"
        hint = _suggest_format(sample, fmt) if sample else ""
        raise DataError(
            f"no usable training pairs in {source} for data.format={fmt.name} "
            f"(dropped: {_describe(dropped.get('train', {}))}){hint}"
        )
    return Pairs(train=train, eval=evals, dropped=dropped, rows=rows)
