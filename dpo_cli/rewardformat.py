"""How a task=reward run built its model's inputs, recorded in final/ (`RECORD`), so that
`judge=reward_model` scores a (prompt, response) exactly as training scored a sequence.

Training scores prompt + response as dpo-cli tokenizes them (dpo_cli/data/tokenize.py): the
tokenizer's leading special tokens (BOS) before a text prompt, one EOS after a text response, a
conversation rendered with the chat template (which ends the turn itself: no EOS added), then
truncated to data.max_length / data.max_prompt_length. A reward model's tokenizer called on
`prompt + response` adds no EOS for most causal LMs: the score would be read one token early.
`encode` builds the ids with the same functions training used, from the settings recorded here
and the tokenizer saved beside them (which holds the chat template the data was rendered with).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dpo_cli.data.options import DataConfig

RECORD = "dpo_cli_reward.json"
FORMAT = "dpo_cli"
INPUTS = (
    "prompt + response as dpo_cli.data.tokenize.tokenize_pairs builds them: the tokenizer's leading special "
    "tokens (BOS) before a text prompt, EOS once after a text response; messages rendered with the tokenizer's "
    "chat template (no EOS added after its end of turn); the reward is the score at the last token"
)


def record(data: DataConfig) -> dict[str, Any]:
    """What `encode` needs besides the tokenizer: the truncation settings of the data section."""
    return {
        "format": FORMAT,
        "inputs": INPUTS,
        "chat_template": data.chat_template,  # the file the data was rendered with (the saved tokenizer holds it)
        "max_length": data.max_length,
        "max_prompt_length": data.max_prompt_length,
        "truncation_mode": data.truncation_mode,
    }


def write(final_dir: Path, data: DataConfig) -> list[Path]:
    """`RECORD` in final/ and, for a merged LoRA export, in final/merged/; returns the files written."""
    text = json.dumps(record(data), indent=2) + "\n"
    written = []
    for directory in (final_dir, final_dir / "merged"):
        if directory.is_dir():
            (directory / RECORD).write_text(text)
            written.append(directory / RECORD)
    return written


def read(name_or_path: str, **kwargs: Any) -> dict[str, Any] | None:
    """The record of a reward model (a local directory, or a hub id's file in the cache or
    downloadable: `kwargs` as from_pretrained's), or None when it has none."""
    from transformers.utils import cached_file

    found = cached_file(
        name_or_path, RECORD, _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False, **kwargs,
    )  # fmt: skip
    return json.loads(Path(found).read_text()) if found else None


def encode(
    tokenizer: Any, saved: dict[str, Any], prompts: list[Any], responses: list[str], max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """A padded batch (`collate`) of prompt + response, one row each in order, tokenized as
    training did (`saved`: the record). A prompt is a string, or messages whose response becomes
    the assistant's message. `max_length` (judge.max_length) replaces the recorded one, the
    prompt's room capped below it."""
    from dpo_cli.data.chat import render
    from dpo_cli.data.collate import collate
    from dpo_cli.data.tokenize import tokenize_pairs
    from dpo_cli.errors import DataError

    examples = [
        {"prompt": p, "completion": r if isinstance(p, str) else [{"role": "assistant", "content": r}], "label": True}
        for p, r in zip(prompts, responses, strict=True)
    ]
    rendered, dropped = render(examples, tokenizer, None)
    total = max_length or saved["max_length"]
    lengths = dict(max_length=total, max_prompt_length=min(saved["max_prompt_length"], total - 1))
    tokenized, stats = tokenize_pairs(rendered, tokenizer, truncation_mode=saved["truncation_mode"], **lengths)
    if len(tokenized) != len(examples):
        why = ", ".join([*dropped, *stats.dropped]) or "not tokenized"
        raise DataError(f"judge: a response cannot be scored as the reward model was trained ({why}); "
                        "set judge.input_format=chat or text")  # fmt: skip
    return collate(tokenized, tokenizer.pad_token_id)
