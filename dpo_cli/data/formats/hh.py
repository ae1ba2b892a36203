"""Anthropic HH-RLHF (Bai et al., 2022): rows {"chosen": str, "rejected": str}.

Each side is a whole dialogue, "\\n\\nHuman: ... \\n\\nAssistant: ...". The prompt is the shared
dialogue up to and including the last "\\n\\nAssistant:"; the responses are what follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as option
from typing import ClassVar

from dpo_cli.data.fields import text_field
from dpo_cli.data.formats.base import Format

ASSISTANT = "\n\nAssistant:"
NO_TURN = "no '\\n\\nAssistant:' turn"
EMPTY = "empty response"
DIFFERENT_PROMPTS = "dialogues differ before the last assistant turn"


def split_pair(chosen: str, rejected: str) -> dict[str, str] | str:
    """Split one HH row into {prompt, chosen, rejected}, or return why it cannot be split safely:
    there is no assistant turn, either response is empty (or only white space), or the two
    dialogues differ before the last assistant turn (then no single prompt is shared, and
    cutting at the same offset would mis-attribute text to the responses).
    """
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        return NO_TURN
    prompt = chosen[: cut + len(ASSISTANT)]
    if rejected.rfind(ASSISTANT) != cut or not rejected.startswith(prompt):
        return DIFFERENT_PROMPTS
    chosen_response, rejected_response = chosen[len(prompt) :], rejected[len(prompt) :]
    if not chosen_response.strip() or not rejected_response.strip():
        return EMPTY
    return {"prompt": prompt, "chosen": chosen_response, "rejected": rejected_response}


def normalize(row: dict) -> dict[str, str] | str:
    return split_pair(text_field(row, "chosen"), text_field(row, "rejected"))


@dataclass
class HH(Format):
    """Anthropic HH-RLHF dialogues (see the module docstring)."""

    # source column of a field, e.g. data.format.columns.chosen=good (unset = the field's own name)
    columns: dict[str, str] = option(default_factory=dict)

    name: ClassVar[str] = "hh"
    fields: ClassVar[tuple[str, ...]] = ("chosen", "rejected")

    def normalize(self, row: dict) -> dict[str, str] | str:
        return normalize(row)
