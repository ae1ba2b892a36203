"""Local preference-data files -> rows (plain dicts), with one clear `DataError` per bad input.

We read files ourselves instead of through `datasets.load_dataset`, whose failures surface as
"An error occurred while generating the dataset" with the real cause buried in a traceback.
Here every failure names the config key, the file, the line where it can be located, and the fix.

Supported: `.jsonl`, `.json`, `.csv` (each optionally `.gz`), `.parquet`, or a directory of
them. Each row also keeps its origin (file, 1-based number) so later stages can say which row of
which file is unusable.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

from dpo_cli.errors import DataError

# Base suffix -> can it be gzip-wrapped? Parquet compresses its own pages, so `.parquet.gz`
# would only cost a full decompression before pyarrow could read it.
SUFFIXES = {".jsonl": True, ".json": True, ".csv": True, ".parquet": False}
SUPPORTED = ".jsonl/.json/.parquet/.csv file (optionally .gz)"
_GZIP_MAGIC = b"\x1f\x8b"
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}


class Origin(NamedTuple):
    """A row and where it came from.

    `number` is the 1-based line where the row starts for `.jsonl` and `.csv` (what an editor
    shows, blank lines and the CSV header counted), and the 1-based row position for `.json`
    and `.parquet`, which have no useful line per row.
    """

    file: str
    number: int
    row: dict[str, Any]

    def where(self) -> str:
        """'a.jsonl' line 7 / 'a.parquet' row 7: for messages about this row."""
        unit = "line" if _kind(self.file)[0] in (".jsonl", ".csv") else "row"
        return f"{self.file!r} {unit} {self.number}"


def read_rows(path: str, what: str, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of a file or directory, in (file, line) order; `what` is the config key to name."""
    return [origin.row for origin in read_rows_with_origin(path, what, split)]


def read_rows_with_origin(path: str, what: str, split: str | None = None) -> list[Origin]:
    """The rows of a file or directory with their (file, number), in (file, line) order.

    `file` is the path as the user wrote it (joined with the name for a directory's files), so
    messages built from it match the config. A directory is read non-recursively in name order,
    skipping hidden and unsupported files (READMEs, `.gitattributes` beside data shards); when
    its files are named by split (`train-0000.parquet`, `test_prefs.jsonl.gz`, as hub repos
    name them), only those of `split` are read.
    """
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        names = _split_files(_data_files(expanded, path, what), split, path, what)
        files = [(os.path.join(path, name), os.path.join(expanded, name)) for name in names]
    elif os.path.isfile(expanded):
        files = [(path, expanded)]
    else:
        shown = f"{path!r}" + (f" (expanded to {expanded!r})" if expanded != path else "")
        shown += "" if os.path.isabs(expanded) else f" (relative to {os.getcwd()})"
        raise DataError(f"{what}={shown}: no such file or directory; point it at a {SUPPORTED} or a directory of them")
    rows: list[Origin] = []
    for file, real in files:
        where = f"{what}={path!r}" + (f" file {os.path.basename(real)!r}" if file != path else "")
        rows.extend(Origin(file, number, row) for number, row in _read_file(real, where))
    return rows


def _kind(name: str) -> tuple[str, bool]:
    """(base suffix, gzipped?) of a file name, case-insensitively: 'A.JSONL.gz' -> ('.jsonl', True)."""
    lower = name.lower()
    gz = lower.endswith(".gz")
    return os.path.splitext(lower[:-3] if gz else lower)[1], gz


def _supported(name: str) -> bool:
    suffix, gz = _kind(name)
    return suffix in SUFFIXES and (SUFFIXES[suffix] or not gz)


def _data_files(directory: str, path: str, what: str) -> list[str]:
    names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    files = [n for n in names if _supported(n) and os.path.isfile(os.path.join(directory, n))]
    if not files:
        held = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        raise DataError(
            f"{what}={path!r} is a directory with no .jsonl/.json/.parquet/.csv files (optionally .gz) "
            f"in it (it holds: {held or 'nothing'}); put the data files there or point {what} at one file"
        )
    return files


SPLIT_WORDS = ("train", "test", "validation", "valid", "eval", "dev")


def _split_of(name: str) -> str:
    """The split a shard's name starts with ('train_prefs-0000.parquet' -> 'train_prefs'), or ''."""
    stem = re.split(r"[-.]", name, maxsplit=1)[0]
    return stem if stem.split("_")[0].lower() in SPLIT_WORDS else ""


def has_split(path: str, split: str) -> bool:
    """Whether `path` is a directory holding files of `split` (named by split)."""
    expanded = os.path.expanduser(path)
    if not os.path.isdir(expanded):
        return False
    return any(_split_of(n) == split for n in os.listdir(expanded) if _supported(n))


def _split_files(files: list[str], split: str | None, path: str, what: str) -> list[str]:
    """A directory's files of `split` when its files are named by split; else all of them."""
    splits = {_split_of(n) for n in files}
    if split is None or splits == {""}:
        return files
    chosen = [n for n in files if _split_of(n) == split]
    if not chosen:
        raise DataError(
            f"{what}={path!r} holds files of the splits {', '.join(sorted(s for s in splits if s))} but none of "
            f"{split!r}; set data.train_split / data.eval_split to one of them, or point {what} at one file"
        )
    return chosen


def _read_file(real: str, where: str) -> list[tuple[int, dict[str, Any]]]:
    suffix, gz = _kind(real)
    if not _supported(real):
        shown = suffix + (".gz" if gz else "") if suffix else ""
        problem = f"unsupported file type {shown!r}" if shown else "no file extension"
        raise DataError(f"{where}: {problem}; use .jsonl, .json or .csv (each optionally .gz), or .parquet (never .gz)")
    if suffix == ".parquet":
        rows = _parquet(real, where)
    else:
        rows = _TEXT_READERS[suffix](_text(real, gz, where), where)
    if not rows:
        raise DataError(f"{where} is empty: no rows; check that the file was written completely")
    return rows


def _text(real: str, gz: bool, where: str) -> str:
    """The file's text, read whole: preference files fit in memory, and the readers need lines."""
    try:
        with open(real, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{where} could not be read ({e.strerror or e})") from None
    if gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{where} is not a valid gzip file ({e}); recompress it or drop the .gz suffix") from None
    elif data.startswith(_GZIP_MAGIC):
        raise DataError(f"{where} is gzip-compressed but its name does not end in .gz; rename it to add .gz")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); save it as UTF-8"
        ) from None
    # Spreadsheet exports often start with a byte-order mark, which json and csv would keep.
    return text.removeprefix("\ufeff")


def _jsonl(text: str, where: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    # Split on "\n" only: str.splitlines would also split at U+2028 and other separators that
    # are legal unescaped inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            hint = "; the whole file is one JSON document, so rename it to .json" if _is_json(text) else ""
            raise DataError(f"{where} line {number} is not valid JSON ({e.msg}: column {e.colno}){hint}") from None
        if not isinstance(row, dict):
            raise DataError(
                f"{where} line {number} is {_json_type(row)}, not a JSON object; "
                'each line must be one object like {"prompt": ..., "chosen": ..., "rejected": ...}'
            )
        rows.append((number, row))
    return rows


def _json(text: str, where: str) -> list[tuple[int, dict[str, Any]]]:
    """A list of objects, or columns: an object of equal-length lists (pandas' `orient='list'`)."""
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; if it holds one object per line, rename it to .jsonl" if e.msg == "Extra data" else ""
        raise DataError(f"{where} line {e.lineno} is not valid JSON ({e.msg}: column {e.colno}){hint}") from None
    shapes = 'a list of objects [{"prompt": ...}, ...] or columns {"prompt": [...], ...}'
    if isinstance(data, list):
        for number, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{where} item {number} is {_json_type(row)}, not an object; it must hold {shapes}")
        return list(enumerate(data, start=1))
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(
                f"{where} has columns of different lengths ({lengths}); every column needs one value per row"
            )
        columns = list(data)
        n = len(data[columns[0]]) if columns else 0
        return [(i + 1, {k: data[k][i] for k in columns}) for i in range(n)]
    raise DataError(f"{where} is {_json_type(data)}, not {shapes}")


def _csv(text: str, where: str) -> list[tuple[int, dict[str, Any]]]:
    """Rows keyed by the header; values stay strings, as CSV has no types."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    try:
        while True:
            start = reader.line_num + 1  # a quoted value can span lines: name the record's first
            try:
                record = next(reader)
            except StopIteration:
                break
            if not record:  # a blank line
                continue
            if header is None:
                header = record
            elif len(record) != len(header):
                raise DataError(
                    f"{where} line {start} has {len(record)} fields but the header has {len(header)}; "
                    "quote values that contain commas"
                )
            else:
                rows.append((start, dict(zip(header, record, strict=True))))
    except csv.Error as e:
        raise DataError(
            f"{where} line {reader.line_num} is not valid CSV ({e}); check its quoting, or save the data as .jsonl"
        ) from None
    return rows


def _parquet(real: str, where: str) -> list[tuple[int, dict[str, Any]]]:
    # Imported here: pyarrow arrives with `datasets`, and only parquet users need it loaded.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(real)
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where} is not a readable parquet file ({first}); rewrite it or use .jsonl") from None
    return list(enumerate(table.to_pylist(), start=1))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "a number")


_TEXT_READERS: dict[str, Callable[[str, str], list[tuple[int, dict[str, Any]]]]] = {
    ".jsonl": _jsonl,
    ".json": _json,
    ".csv": _csv,
}
