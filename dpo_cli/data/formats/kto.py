"""Unpaired examples for KTO: rows {"prompt", "completion", "label": bool}, as text or as conversations.

`label` is true for a desirable completion and false for an undesirable one, as in TRL's
unpaired preference format. The completion is the response only (the prompt is not repeated).
Conversational rows hold lists of {role, content} messages (see `chat`): the prompt is a list of
messages, or a string for the user's turn; the completion is the assistant's reply (a whole
conversation that begins with the prompt has the prompt taken off).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as option
from typing import Any, ClassVar

from dpo_cli.data.chat import text_or_messages
from dpo_cli.data.fields import RowError, field
from dpo_cli.data.formats.base import Format
from dpo_cli.data.formats.pairs import EMPTY_RESPONSE, responses_only, same_kind

EMPTY = "empty completion"


def normalize(row: dict) -> dict[str, Any] | str:
    """The row as {prompt, completion, label}, or why it is dropped (an empty completion, or a
    conversational completion holding a user or system turn)."""
    prompt, completion = text_or_messages(row, "prompt"), text_or_messages(row, "completion")
    label = field(row, "label")
    if not isinstance(label, bool):
        raise RowError("label", f"field 'label' must be true or false, got {label!r}")
    if isinstance(completion, str):
        same_kind("prompt", prompt, "completion", completion)
        if not completion.strip():
            return EMPTY
        return {"prompt": prompt, "completion": completion, "label": label}
    if isinstance(prompt, str):  # the user's turn
        prompt = [{"role": "user", "content": prompt}]
    completion = responses_only(prompt, completion)
    if isinstance(completion, str):
        return EMPTY if completion == EMPTY_RESPONSE else completion
    return {"prompt": prompt, "completion": completion, "label": label}


@dataclass
class KTO(Format):
    """Unpaired prompt/completion/label rows: only losses that do not need pairs train on them."""

    # source column of a field, e.g. data.format.columns.completion=text (unset = the field's own name)
    columns: dict[str, str] = option(default_factory=dict)

    name: ClassVar[str] = "kto"
    fields: ClassVar[tuple[str, ...]] = ("prompt", "completion", "label")
    paired: ClassVar[bool] = False
    hint: ClassVar[tuple[frozenset[str], str]] = (
        frozenset({"prompt", "completion", "label"}),
        "these rows look like unpaired examples: use data=kto with loss=kto",
    )

    def normalize(self, row: dict) -> dict[str, Any] | str:
        return normalize(row)
