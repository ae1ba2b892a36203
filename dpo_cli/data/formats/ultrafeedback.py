"""UltraFeedback, binarized (Cui et al., 2023; HuggingFaceH4/ultrafeedback_binarized, as used
for Zephyr): rows {"prompt": str, "chosen": [messages], "rejected": [messages], "score_chosen",
"score_rejected", ...} with splits `train_prefs` / `test_prefs`.

`chosen` and `rejected` are whole conversations, {role, content} messages that begin with the
user's turn (the `prompt` again); the prompt is the messages they share from the start (a system
turn, earlier turns), the responses the assistant turns after it (see `pairs.split_messages`).
The pair stays conversational: `chat.render` writes it with the model's chat template. Ties
(`score_chosen == score_rejected`) carry no preference and are dropped, as are rows whose
chosen scores below its rejected (mislabelled; swapping them would silently rewrite the data).
Other columns (`prompt_id`, `messages`) are not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as option
from typing import Any, ClassVar

from dpo_cli.data.chat import messages
from dpo_cli.data.fields import RowError, field, text_field
from dpo_cli.data.formats.base import Format
from dpo_cli.data.formats.pairs import split_messages

TIE = "tie (score_chosen == score_rejected)"
REVERSED = "score_chosen below score_rejected"


def _score(row: dict, name: str) -> float:
    value = field(row, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(name, f"field {name!r} must be a number, got {type(value).__name__}")
    return value


def normalize(row: dict) -> dict[str, Any] | str:
    """A conversational {prompt, chosen, rejected} pair of message lists, or why it is dropped."""
    prompt = text_field(row, "prompt")
    chosen, rejected = messages(field(row, "chosen"), "chosen"), messages(field(row, "rejected"), "rejected")
    score_chosen, score_rejected = _score(row, "score_chosen"), _score(row, "score_rejected")
    if score_chosen == score_rejected:
        return TIE
    if score_chosen < score_rejected:
        return REVERSED
    return split_messages(chosen, rejected, prompt)


@dataclass
class UltraFeedback(Format):
    """UltraFeedback (binarized): conversational chosen/rejected with scores."""

    # source column of a field, e.g. data.format.columns.chosen=good (unset = the field's own name)
    columns: dict[str, str] = option(default_factory=dict)

    name: ClassVar[str] = "ultrafeedback"
    fields: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")
    hint: ClassVar[tuple[frozenset[str], str]] = (
        frozenset({"score_chosen", "score_rejected", "chosen", "rejected"}),
        "these rows look like UltraFeedback (binarized): use data=ultrafeedback",
    )

    def normalize(self, row: dict) -> dict[str, Any] | str:
        return normalize(row)
