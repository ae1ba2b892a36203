"""Preference pairs in the common shapes, as text or as conversations.

Text: explicit prompt ({prompt, chosen, rejected} strings) or implicit prompt ({chosen, rejected}
only, each the whole text). With an implicit prompt, the prompt is the longest common prefix of
chosen and rejected, cut back to the end of the last "\\n\\nAssistant:" turn marker inside it
(dialogues), else to the last white space (so that no word is split between prompt and response).

Conversational: chosen and rejected are lists of {role, content} messages (see `chat`), rendered
later with the chat template. The prompt is
- a list of messages (explicit; chosen and rejected are the assistant's replies, or whole
  conversations that begin with the prompt, which is then taken off them),
- a string (the user's turn, as in UltraFeedback, whose chosen and rejected repeat it: when they
  share leading messages, those are the prompt, system turn included), or
- absent (implicit; the prompt is the messages chosen and rejected share from the start).
The responses are what follows the prompt; they must be assistant turns.

Rows whose two sides share no prompt, or that leave a response empty, are dropped with the reason.

Optional `margin`: a number per pair, how much more the chosen response is preferred (Llama 2's
margin, e.g. from the gap between two ratings); task=reward subtracts it in the Bradley-Terry
loss (dpo_cli/reward.py), a row without one has margin 0, and task=dpo refuses data carrying it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from dataclasses import field as option
from typing import Any, ClassVar

from dpo_cli.data.chat import Message, text_or_messages
from dpo_cli.data.fields import RowError
from dpo_cli.data.formats.base import Format
from dpo_cli.data.tokenize import IDENTICAL  # the same reason as identical token ids: one count

ASSISTANT = "\n\nAssistant:"
NO_SHARED_PROMPT = "no shared prompt (chosen and rejected differ from the start)"
NO_SHARED_MESSAGES = "no shared prompt messages (chosen and rejected differ from the first message)"
EMPTY_RESPONSE = "empty response (no messages after the prompt)"
EMPTY_TEXT = "empty response (chosen or rejected is empty or only white space)"
NOT_ASSISTANT = "a response holds a user or system turn, not only assistant turns"


def split_implicit(chosen: str, rejected: str) -> dict[str, str] | str:
    """{prompt, chosen, rejected} from two whole texts, or the reason they cannot be split."""
    shared = os.path.commonprefix([chosen, rejected])
    turn = shared.rfind(ASSISTANT)
    if turn >= 0:
        cut = turn + len(ASSISTANT)
    else:
        cut = max(shared.rfind(" "), shared.rfind("\n"), shared.rfind("\t"))
    if cut <= 0:
        return NO_SHARED_PROMPT
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def _shared(a: list[Message], b: list[Message]) -> int:
    """How many messages a and b share from the start."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def responses_only(prompt: list[Message], response: list[Message]) -> list[Message] | str:
    """`response` without the prompt it may repeat, or why it cannot be a response: nothing left,
    or a user or system turn in it."""
    if response[: len(prompt)] == prompt:
        response = response[len(prompt) :]
    if not response:
        return EMPTY_RESPONSE
    if any(m["role"] in ("user", "system") for m in response):
        return NOT_ASSISTANT
    return response


def split_messages(
    chosen: list[Message], rejected: list[Message], prompt: str | list[Message] | None = None
) -> dict[str, list[Message]] | str:
    """{prompt, chosen, rejected} message lists, or the reason the row is dropped (see the module
    docstring for the three kinds of prompt)."""
    if chosen == rejected:
        return IDENTICAL
    if prompt is None or isinstance(prompt, str):
        n = _shared(chosen, rejected)
        if n:
            prompt = chosen[:n]
        elif prompt is None:
            return NO_SHARED_MESSAGES
        else:  # the responses are replies only: the prompt string is the user's turn
            prompt = [{"role": "user", "content": prompt}]
    c, r = responses_only(prompt, chosen), responses_only(prompt, rejected)
    if isinstance(c, str) or isinstance(r, str):
        return c if isinstance(c, str) else r
    return {"prompt": prompt, "chosen": c, "rejected": r}


def same_kind(name: str, value: Any, other: str, other_value: Any) -> None:
    """A RowError unless `value` (field `name`) is text exactly when `other_value` is."""
    if isinstance(value, str) != isinstance(other_value, str):
        kind = "a string" if isinstance(other_value, str) else "a list of messages"
        raise RowError(name, f"field {name!r} must be {kind}, like field {other!r}")


def margin_of(row: dict) -> float | None:
    """The row's `margin` field as a float (None when absent or null: margin 0): a finite number
    (not a boolean), else a RowError."""
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError("margin", f"field 'margin' must be a finite number, got {value!r}")
    return float(value)


def normalize(row: dict) -> dict[str, Any] | str:
    """{prompt, chosen, rejected} (and `margin` when the row has one), or why the row is dropped."""
    margin = margin_of(row)
    pair = _normalize(row)
    if margin is not None and not isinstance(pair, str):
        pair["margin"] = margin
    return pair


def _normalize(row: dict) -> dict[str, Any] | str:
    chosen, rejected = text_or_messages(row, "chosen"), text_or_messages(row, "rejected")
    same_kind("rejected", rejected, "chosen", chosen)
    prompt = text_or_messages(row, "prompt") if "prompt" in row else None
    if isinstance(chosen, str):
        if prompt is None:
            return split_implicit(chosen, rejected)
        same_kind("prompt", prompt, "chosen", chosen)
        if not chosen.strip() or not rejected.strip():
            return EMPTY_TEXT
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return split_messages(chosen, rejected, prompt)  # a text prompt is the user's turn


@dataclass
class Pairs(Format):
    """Preference pairs with an explicit or implicit prompt, as text or conversations."""

    # source column of a field, e.g. data.format.columns.chosen=good (unset = the field's own name)
    columns: dict[str, str] = option(default_factory=dict)

    name: ClassVar[str] = "pairs"
    fields: ClassVar[tuple[str, ...]] = ("chosen", "rejected")
    optional: ClassVar[tuple[str, ...]] = ("prompt", "margin")
    hint: ClassVar[tuple[frozenset[str], str]] = (
        frozenset({"chosen", "rejected"}),
        "these rows hold chosen/rejected texts: use data=pairs (explicit or implicit prompt)",
    )

    def normalize(self, row: dict) -> dict[str, Any] | str:
        return normalize(row)
