"""Unpaired examples for KTO: rows {"prompt": str, "completion": str, "label": bool}.

`label` is true for a desirable completion and false for an undesirable one, as in TRL's
unpaired preference format. The completion is the response only (the prompt is not repeated).
"""

from __future__ import annotations

from typing import Any


def normalize(row: dict) -> dict[str, Any] | None:
    """The row as {prompt, completion, label}; None when the completion is empty."""
    prompt, completion, label = row["prompt"], row["completion"], row["label"]
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise TypeError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not isinstance(label, bool):
        raise TypeError(f"field 'label' must be true or false, got {label!r}")
    if not completion.strip():
        return None
    return {"prompt": prompt, "completion": completion, "label": label}
