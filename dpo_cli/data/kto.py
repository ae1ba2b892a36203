"""Unpaired examples for KTO: rows {"prompt": str, "completion": str, "label": bool}.

`label` is true for a desirable completion and false for an undesirable one, as in TRL's
unpaired preference format. The completion is the response only (the prompt is not repeated).
"""

from __future__ import annotations

from typing import Any

from dpo_cli.data.fields import RowError, field, text_field


def normalize(row: dict) -> dict[str, Any] | str:
    """The row as {prompt, completion, label}, or why it is dropped (an empty completion)."""
    prompt, completion, label = text_field(row, "prompt"), text_field(row, "completion"), field(row, "label")
    if not isinstance(label, bool):
        raise RowError("label", f"field 'label' must be true or false, got {label!r}")
    if not completion.strip():
        return "empty completion"
    return {"prompt": prompt, "completion": completion, "label": label}
