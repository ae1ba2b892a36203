"""What every data format is: a dataclass of its options with `normalize`, and class attributes
that say what the loader and the messages need to know about it.

A format module under `dpo_cli/data/formats/` defines one subclass of `Format`. Its dataclass
fields are its options (`data.format.<field>` in the config; a schema is generated from them,
see `dpo_cli.data.options.register_schemas`); its class attributes replace the central lists
the loader used to keep (required fields, paired or not, the hint for rows that fit it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

Example = dict[str, Any]  # {prompt, chosen, rejected} or {prompt, completion, label}


@dataclass
class Format:
    """A data format: source rows -> normalized examples (or the reason a row is dropped).

    Subclasses set `name` (as in `data=<name>` and in messages), `fields` (the row fields
    `normalize` needs: a row lacking several is told all of them), `optional` (fields read when
    present), `paired` (False: unpaired completions with a label, for KTO-like losses),
    `hint` (the columns that mark rows of this format, and what to tell a user whose rows have
    them), and `reads_rows` (False: the format generates its examples, see `generate`).
    """

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()
    paired: ClassVar[bool] = True
    reads_rows: ClassVar[bool] = True
    hint: ClassVar[tuple[frozenset[str], str] | None] = None

    def normalize(self, row: dict) -> Example | str:
        """One source row (columns already renamed to the format's fields) as an example, or
        the reason it is dropped; a missing field or a wrong type raises `RowError`."""
        raise NotImplementedError(f"format {self.name!r} does not read rows")

    def finalize(self, examples: list[Example]) -> tuple[list[Example], dict[str, int]]:
        """Per-split work a row-by-row `normalize` cannot do, on one split's examples in source
        order: the examples kept and how many were dropped for each reason. Default: none."""
        return examples, {}

    def generate(self, seed: int) -> tuple[list[Example], list[Example]]:
        """Train and eval examples of a format that makes them instead of reading rows."""
        raise NotImplementedError(f"format {self.name!r} reads rows; it does not generate them")

    def column_map(self) -> dict[str, str]:
        """Field -> source column for the columns set (null ones mean the field's own name)."""
        columns: Mapping[str, Any] = getattr(self, "columns", None) or {}
        return {str(k): str(v) for k, v in columns.items() if v is not None}

    def problems(self) -> list[str]:
        """The options' problems, one message each naming the key (`data.format.…`): by default,
        columns may only map the format's own fields, to a column name."""
        columns: Any = getattr(self, "columns", None)
        if columns is None:
            return []
        if not isinstance(columns, Mapping):
            return [f"data.format.columns={columns!r} must map field names to source columns"]
        known = (*self.fields, *self.optional)
        out = []
        for key, column in columns.items():
            if key not in known and column is not None:  # null: the field's own name, harmless
                out.append(
                    f"data.format.columns.{key}={column!r}: format {self.name!r} has no field {key!r}; "
                    f"its fields are {', '.join(known)}"
                )
            elif column is not None and not isinstance(column, str):
                out.append(f"data.format.columns.{key}={column!r} must be a column name (a string) or null")
        return out
