"""Reading local data files: every format to exact rows and origins, and one clear DataError per bad input."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_cli.data.sources import Origin, read_rows, read_rows_with_origin
from dpo_cli.errors import DataError

# Strings only, so CSV (which has no types) reads back the same rows. The second rejected response
# holds a quoted comma and a newline, so its CSV record spans lines 3-4 and the next starts at 5.
ROWS = [
    {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    {"prompt": "2+2?", "chosen": "4", "rejected": 'five, "or so"\nmaybe'},
    {"prompt": "Café?", "chosen": "Oui", "rejected": "No"},
]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _csv(rows: list[dict]) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _columns(rows: list[dict]) -> str:
    return json.dumps({k: [r[k] for r in rows] for k in rows[0]})


def write(path: Path, content: str | bytes) -> Path:
    """Write text as UTF-8, gzip-compressed when the name ends in .gz; bytes exactly as given."""
    if isinstance(content, str):
        content = gzip.compress(content.encode()) if path.name.endswith(".gz") else content.encode()
    path.write_bytes(content)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def error(path: Path | str, what: str = "data.path") -> str:
    """The message of the DataError that reading `path` raises; it must be one line."""
    with pytest.raises(DataError) as info:
        read_rows(str(path), what)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- formats -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "numbers"),
    [
        ("a.jsonl", _jsonl(ROWS), [1, 2, 3]),
        ("a.jsonl.gz", _jsonl(ROWS), [1, 2, 3]),
        ("a.json", json.dumps(ROWS, indent=2), [1, 2, 3]),
        ("a.json.gz", json.dumps(ROWS), [1, 2, 3]),
        ("columns.json", _columns(ROWS), [1, 2, 3]),
        ("columns.json.gz", _columns(ROWS), [1, 2, 3]),
        ("a.csv", _csv(ROWS), [2, 3, 5]),  # header on line 1; record 2 spans lines 3-4
        ("a.csv.gz", _csv(ROWS), [2, 3, 5]),
        ("UPPER.JSONL", _jsonl(ROWS), [1, 2, 3]),
    ],
)
def test_text_formats_read_exact_rows_and_origins(tmp_path, name, content, numbers):
    path = write(tmp_path / name, content)
    assert read_rows(str(path), "data.path") == ROWS
    origins = read_rows_with_origin(str(path), "data.path")
    assert origins == [Origin(str(path), n, row) for n, row in zip(numbers, ROWS, strict=True)]


def test_csv_numbers_stay_strings_and_bom_is_dropped(tmp_path):
    """Excel writes a byte-order mark, which would otherwise end up in the first column's name."""
    path = write(tmp_path / "a.csv", "\ufeffprompt,score\r\nq,1\r\n\r\nr,2.5\r\n")
    assert read_rows_with_origin(str(path), "data.path") == [
        Origin(str(path), 2, {"prompt": "q", "score": "1"}),
        Origin(str(path), 4, {"prompt": "r", "score": "2.5"}),
    ]


def test_parquet_reads_exact_rows_with_types(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "score": 1.5, "tags": ["a", "b"]}] * 2
    path = write_parquet(tmp_path / "a.parquet", rows)
    assert read_rows_with_origin(str(path), "data.path") == [
        Origin(str(path), 1, rows[0]),
        Origin(str(path), 2, rows[1]),
    ]


def test_jsonl_blank_lines_skipped_but_counted(tmp_path):
    path = write(tmp_path / "a.jsonl", '\n{"n": 1}\n\n  \r\n{"n": 2}\r\n\n')
    origins = read_rows_with_origin(str(path), "data.path")
    assert [(o.number, o.row) for o in origins] == [(2, {"n": 1}), (5, {"n": 2})]


def test_jsonl_line_separators_inside_strings_are_not_line_breaks(tmp_path):
    """U+2028 is legal unescaped in a JSON string; str.splitlines would split the row there."""
    row = {"text": "one\u2028two\x85three"}
    path = write(tmp_path / "a.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
    assert read_rows(str(path), "data.path") == [row]


def test_directory_reads_supported_files_in_name_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write(shards / "b.csv", _csv(ROWS[1:2]))
    write(shards / "a.jsonl.gz", "\n" + _jsonl(ROWS[:1]))
    write_parquet(shards / "c.parquet", ROWS[2:])
    write(shards / ".hidden.jsonl", _jsonl([{"hidden": "yes"}]))
    write(shards / "README.md", "# not data")
    (shards / "sub").mkdir()
    write(shards / "sub" / "d.jsonl", _jsonl([{"nested": "yes"}]))

    given = str(shards)
    assert read_rows(given, "data.path") == ROWS
    assert read_rows_with_origin(given, "data.path") == [
        Origin(os.path.join(given, "a.jsonl.gz"), 2, ROWS[0]),
        Origin(os.path.join(given, "b.csv"), 2, ROWS[1]),
        Origin(os.path.join(given, "c.parquet"), 1, ROWS[2]),
    ]


def test_home_is_expanded_and_origin_keeps_the_path_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "a.jsonl", _jsonl(ROWS))
    origins = read_rows_with_origin("~/a.jsonl", "data.path")
    assert [o.row for o in origins] == ROWS
    assert {o.file for o in origins} == {"~/a.jsonl"}


def test_origin_where_names_lines_for_line_formats_and_rows_otherwise():
    assert Origin("a.jsonl.gz", 7, {}).where() == "'a.jsonl.gz' line 7"
    assert Origin("a.csv", 3, {}).where() == "'a.csv' line 3"
    assert Origin("d/a.parquet", 2, {}).where() == "'d/a.parquet' row 2"
    assert Origin("a.json", 4, {}).where() == "'a.json' row 4"


def test_large_jsonl_reads_every_row_in_order(tmp_path):
    """20,000 rows: a quadratic reader would take minutes here; ours takes well under a second."""
    path = write(tmp_path / "big.jsonl", "".join(f'{{"i": {i}, "text": "{"x" * 50}"}}\n' for i in range(20_000)))
    origins = read_rows_with_origin(str(path), "data.path")
    assert len(origins) == 20_000
    assert origins[-1].number == 20_000 and origins[-1].row["i"] == 19_999


# --- errors --------------------------------------------------------------------------------


def test_missing_path_message_is_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error("x.jsonl") == (
        f"data.path='x.jsonl' (relative to {tmp_path}): no such file or directory; "
        "point it at a .jsonl/.json/.parquet/.csv file (optionally .gz) or a directory of them"
    )
    assert error(str(tmp_path / "x.jsonl")) == (  # an absolute path is not "relative to" anything
        f"data.path='{tmp_path / 'x.jsonl'}': no such file or directory; "
        "point it at a .jsonl/.json/.parquet/.csv file (optionally .gz) or a directory of them"
    )


def test_missing_path_names_the_key_and_the_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    message = error("~/nope.jsonl", what="data.eval_path")
    assert message.startswith(f"data.eval_path='~/nope.jsonl' (expanded to '{tmp_path}/nope.jsonl'): no such file")


@pytest.mark.parametrize(
    ("name", "named"),
    [("a.txt", "'.txt'"), ("a.xlsx", "'.xlsx'"), ("a.parquet.gz", "'.parquet.gz'"), ("data", "no file extension")],
)
def test_unknown_file_type_names_the_suffix_and_the_supported_ones(tmp_path, name, named):
    message = error(write(tmp_path / name, "x"))
    assert f"data.path='{tmp_path / name}': " in message
    assert named in message
    assert all(s in message for s in (".jsonl", ".json", ".csv", ".parquet", ".gz"))


BINARY = bytes(range(0x80, 0x100)) * 4  # no valid UTF-8 start byte at offset 0


@pytest.mark.parametrize(
    ("name", "content", "phrases"),
    [
        # JSON syntax: the 1-based line, json's message and column.
        (
            "a.jsonl",
            _jsonl([{"n": i} for i in range(6)]) + '{"abcd": 1 "b": 2}\n',
            ["line 7 is not valid JSON (Expecting ',' delimiter: column 12)"],
        ),
        ("a.jsonl.gz", '{"n": 1}\n\n{"n": \n', ["line 3 is not valid JSON (Expecting value: column 7)"]),
        ("a.json", '[\n  {"n": 1},\n  {"n": 2,}\n]', ["line 3 is not valid JSON (Expecting property name"]),
        # A whole-file JSON document named .jsonl, and JSON lines named .json: say which to rename.
        ("a.jsonl", json.dumps(ROWS, indent=2), ["line 1 is not valid JSON", "rename it to .json"]),
        ("a.json", _jsonl(ROWS), ["line 2 is not valid JSON (Extra data: column 1)", "rename it to .jsonl"]),
        # Valid JSON of the wrong shape.
        ("a.jsonl", '{"n": 1}\n[1, 2]\n', ["line 2 is an array, not a JSON object", "each line must be one object"]),
        ("a.jsonl", '{"n": 1}\n\n"text"\n', ["line 3 is a string, not a JSON object"]),
        ("a.jsonl", "42\n", ["line 1 is a number, not a JSON object"]),
        ("a.json", '[{"n": 1}, null]', ["item 2 is null, not an object", "a list of objects"]),
        ("a.json", '"text"', ["is a string, not a list of objects", "or columns"]),
        ("a.json", '{"prompt": ["a", "b"], "chosen": ["c"]}', ["columns of different lengths", "'chosen': 1"]),
        ("a.json", '{"prompt": "a", "chosen": "c"}', ["is an object, not a list of objects"]),
        # Bytes that are not UTF-8 text, plain or inside gzip.
        ("a.jsonl", b'{"a": "ok"}\n{"a": "caf\xe9"}\n', ["is not UTF-8 text (byte 0xe9 at offset 22, line 2)"]),
        (
            "a.csv.gz",
            gzip.compress(b"prompt\ncaf\xe9\n", mtime=0),
            ["is not UTF-8 text (byte 0xe9 at offset 10, line 2)", "save it as UTF-8"],
        ),
        ("a.json", BINARY, ["is not UTF-8 text (byte 0x80 at offset 0, line 1); save it as UTF-8"]),
        # Broken or misnamed gzip.
        ("a.jsonl.gz", gzip.compress(b'{"n": 1}\n', mtime=0)[:-6], ["is not a valid gzip file"]),
        ("a.jsonl.gz", b'{"n": 1}\n', ["is not a valid gzip file (Not a gzipped file", "drop the .gz suffix"]),
        ("a.jsonl", gzip.compress(b'{"n": 1}\n', mtime=0), ["is gzip-compressed", "rename it to add .gz"]),
        # Nothing to read.
        ("a.jsonl", b"", ["is empty: no rows"]),
        ("a.jsonl", "\n  \n\r\n", ["is empty: no rows"]),
        ("a.jsonl.gz", gzip.compress(b"", mtime=0), ["is empty: no rows"]),
        ("a.json", "", ["is empty: no rows"]),
        ("a.json", "[]", ["is empty: no rows"]),
        ("a.json", "{}", ["is empty: no rows"]),
        ("a.csv", "prompt,chosen,rejected\n", ["is empty: no rows"]),
        # CSV structure.
        ("a.csv", "prompt,chosen\na,b\nc,d,e\n", ["line 3 has 3 fields but the header has 2", "quote values"]),
        ("a.csv", f'prompt,chosen\na,b\n"{"x" * 140_000}",d\n', ["line 3 is not valid CSV (field larger", ".jsonl"]),
    ],
)
def test_bad_file_gives_one_line_naming_file_line_and_fix(tmp_path, name, content, phrases):
    path = write(tmp_path / name, content)
    message = error(path)
    assert message.startswith(f"data.path={str(path)!r}")
    for phrase in phrases:
        assert phrase in message


@pytest.mark.parametrize(
    "content",
    [b"PAR1 this is not a parquet file PAR1", b"", b"not parquet at all"],
)
def test_corrupt_parquet_names_the_file_and_pyarrow_reason(tmp_path, content):
    path = write(tmp_path / "a.parquet", content)
    with pytest.raises(pa.ArrowException) as arrow:
        pq.read_table(path)
    message = error(path)
    assert message.startswith(f"data.path={str(path)!r} is not a readable parquet file (")
    assert str(arrow.value).strip().splitlines()[0] in message


def test_truncated_parquet_is_a_data_error(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", ROWS)
    path.write_bytes(path.read_bytes()[:-20])
    assert "is not a readable parquet file" in error(path)


def test_empty_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    assert error(path) == f"data.path={str(path)!r} is empty: no rows; check that the file was written completely"


def test_directory_without_data_files_lists_what_it_holds(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    for name in ["notes.txt", "a.xlsx", "b.parquet.gz", "c.md", "e.py", "f.yaml", ".hidden.jsonl"]:
        write(folder / name, "x")
    (folder / "sub.jsonl").mkdir()  # a directory named like data is not data
    message = error(folder, what="data.eval_path")
    assert message.startswith(f"data.eval_path='{folder}' is a directory with no .jsonl/.json/.parquet/.csv files")
    assert "it holds: a.xlsx, b.parquet.gz, c.md, e.py, f.yaml, ... (7 in all)" in message
    assert "point data.eval_path at one file" in message


def test_empty_directory(tmp_path):
    assert "(it holds: nothing)" in error(tmp_path)


def test_error_in_a_directory_names_the_file_and_line(tmp_path):
    write(tmp_path / "a.jsonl", _jsonl(ROWS))
    write(tmp_path / "b.jsonl", '{"n": 1}\n{"n": 2\n')
    message = error(tmp_path)
    assert message.startswith(f"data.path='{tmp_path}' file 'b.jsonl' line 2 is not valid JSON")
