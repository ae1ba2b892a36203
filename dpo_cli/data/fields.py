"""Reading one field of a source row, with the error a user can act on."""

from __future__ import annotations

from typing import Any


class RowError(Exception):
    """A row lacks a field or holds the wrong type there; the loader adds the file and row."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def field(row: dict, name: str) -> Any:
    if name not in row:
        raise RowError(name, f"field {name!r} is missing (the row has: {', '.join(map(str, row)) or 'nothing'})")
    return row[name]


def text_field(row: dict, name: str) -> str:
    value = field(row, name)
    if not isinstance(value, str):
        raise RowError(name, f"field {name!r} must be a string, got {type(value).__name__}")
    return value
