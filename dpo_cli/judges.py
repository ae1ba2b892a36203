"""Judges for generation evaluation: each scores (prompt, response) pairs, higher is better.

A judge is a `_target_` object (conf/judge/): `score(prompts, responses)` returns one float per
response. Generation evaluation compares the policy's score with the reference's on the same
prompt (evalgen.py); a judge never sees which model wrote a response.

- `SortJudge`: exact, for the built-in task (data=synthetic): 1 when the response is the
  prompt's digits in ascending order, else 0.
- `RewardModelJudge`: any Hugging Face sequence-classification model with one output (a reward
  model), by local directory or hub id, with its own tokenizer and input format (a task=reward
  run's final/: its inputs built as training built them, `dpo_cli.rewardformat`).

A prompt is what the data holds: a string, or a list of {role, content} messages.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from dpo_cli.errors import ModelLoadError
from dpo_cli.hub import looks_like_path
from dpo_cli.rewardformat import FORMAT, RECORD, encode, read

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]
SORT_PROMPT = re.compile(r"^sort (\d+):$")


class SortJudge:
    """The built-in task's rule (dpo_cli/data/formats/synthetic.py): the response must be exactly the
    prompt's digits in ascending order (surrounding spaces aside). Scores 1 or 0; `verdict`
    says why a response failed (misordered, miscopied, other)."""

    def describe(self) -> str:
        return "exact (the built-in task's rule: the prompt's digits in ascending order)"

    def check(self, prompts: list[Prompt]) -> str | None:
        """A problem when the prompts are not the built-in task's (before any weights load)."""
        for prompt in prompts:
            try:
                self.answer(prompt)
            except ValueError as e:
                return str(e)
        return None

    @staticmethod
    def answer(prompt: Prompt) -> str:
        found = SORT_PROMPT.match(prompt) if isinstance(prompt, str) else None
        if found is None:
            raise ValueError(
                f"judge=sort scores the built-in task's prompts ('sort 3917:'), got {str(prompt)[:60]!r}; "
                "use it with data=synthetic, or choose another judge (judge=reward_model)"
            )
        return "".join(sorted(found.group(1)))

    def verdict(self, prompt: Prompt, response: str) -> str:
        answer, given = self.answer(prompt), response.strip()
        if given == answer:
            return "correct"
        if sorted(given) == sorted(answer):
            return "misordered"
        if given.isdigit() and len(given) == len(answer) and list(given) == sorted(given):
            return "miscopied"
        return "other"

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        return [float(self.verdict(p, r) == "correct") for p, r in zip(prompts, responses, strict=True)]


def conversation_text(prompt: Prompt, response: str) -> str:
    """A prompt and its response as one text: a string prompt is followed by the response as it
    is (HH's "...\\n\\nAssistant:" + " reply"); messages are written as HH writes turns."""
    if isinstance(prompt, str):
        return prompt + response
    turns = "".join(f"\n\n{m['role'].capitalize()}: {m['content']}" for m in prompt)
    return f"{turns}\n\nAssistant: {response.strip()}"


def as_messages(prompt: Prompt, response: str) -> list[dict[str, str]]:
    """The conversation as chat messages (a string prompt becomes one user turn)."""
    head = [{"role": "user", "content": prompt.strip()}] if isinstance(prompt, str) else list(prompt)
    return [*head, {"role": "assistant", "content": response.strip()}]


INPUT_FORMATS = ("auto", "chat", "pair", "text", "dpo_cli")
MAX_LENGTH = 1024  # tokens of a judge's input when judge.max_length is null (but with dpo_cli inputs)


class RewardModelJudge:
    """A reward model: `AutoModelForSequenceClassification` with a single output, its score the
    reward. Inputs, by `input_format`:
      chat: prompt and response as messages through the reward model's own chat template;
      pair: (prompt, response) as a text pair (e.g. OpenAssistant's DeBERTa reward models);
      text: prompt followed by the response, one text;
      dpo_cli: as a task=reward run of dpo-cli built its inputs (final/dpo_cli_reward.json, see
        `dpo_cli.rewardformat`): prompt + response + EOS, or messages through the chat template;
      auto: dpo_cli when the reward model has that record, else chat when its tokenizer has a chat
        template, else text.
    `max_length`: None = the training run's data.max_length (dpo_cli inputs), else 1024.
    Loaded once, on first use (validation builds the object without loading anything)."""

    def __init__(
        self,
        name_or_path: str,
        revision: str | None = None,
        tokenizer: str | None = None,
        input_format: str = "auto",
        max_length: int | None = None,
        batch_size: int = 8,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format={input_format!r} must be one of {', '.join(INPUT_FORMATS)}")
        if (max_length is not None and max_length < 1) or batch_size < 1:
            raise ValueError("max_length and batch_size must be >= 1")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r} must be float32, bfloat16 or float16")
        self.name_or_path, self.revision, self.tokenizer_name = name_or_path, revision, tokenizer
        self.input_format, self.max_length, self.batch_size = input_format, max_length, batch_size
        self.dtype, self.trust_remote_code = dtype, trust_remote_code
        self.model: Any = None
        self.tokenizer: Any = None
        self.saved: dict[str, Any] | None = None  # the training run's record (dpo_cli inputs)

    def describe(self) -> str:
        return f"reward model {self.name_or_path}"

    def check(self, prompts: list[Prompt]) -> str | None:
        """What stops the reward model from loading, or None: the checks `load` starts with,
        which read its config but no weights. Training runs them before the policy's weights
        load, and mode=inspect reports them; any prompt will do."""
        try:
            self._sources()
        except ModelLoadError as e:
            return str(e)
        return None

    def _sources(self) -> dict[str, Any]:
        """from_pretrained kwargs for the model and its tokenizer, once their files are found
        (a local directory with weights, or a hub id cached or reachable) and its config says
        one output; else a ModelLoadError."""
        from transformers import AutoConfig

        from dpo_cli.modeling import TOKENIZER_PROBE, WEIGHT_SUFFIXES, source_kwargs

        name, key = self.name_or_path, "judge.name_or_path"
        kwargs = source_kwargs(name, self.revision, "config.json", key)
        local = Path(name).expanduser() if looks_like_path(name) else None
        if local is not None and not any(p.name.endswith(WEIGHT_SUFFIXES) for p in local.iterdir()):
            raise ModelLoadError(f"{key}={name!r}: {local} has config.json but no weights (*.safetensors or *.bin)")
        if self.tokenizer_name is not None:
            source_kwargs(self.tokenizer_name, None, TOKENIZER_PROBE, "judge.tokenizer")
        else:
            source_kwargs(name, self.revision, TOKENIZER_PROBE, key)
        try:
            config = AutoConfig.from_pretrained(
                name, revision=self.revision, trust_remote_code=self.trust_remote_code, **kwargs
            )
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load the config of the reward model {name!r}: {e}") from None
        if config.num_labels != 1:
            raise ModelLoadError(f"{name!r} has {config.num_labels} outputs; a reward model has one (num_labels=1)")
        if self.input_format == "dpo_cli" and read(name, revision=self.revision, **kwargs) is None:
            raise ModelLoadError(
                f"judge.input_format=dpo_cli: {name!r} has no {RECORD} (a task=reward run of dpo-cli writes it in "
                "final/); choose another judge.input_format (auto, chat, text, pair)"
            )
        return kwargs

    def load(self, device: Any = "cpu") -> None:
        """Load the model and tokenizer (offline: from a directory or the local cache, or one
        clear error)."""
        if self.model is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpo_cli.modeling import DTYPES

        name = self.name_or_path
        try:
            kwargs = self._sources()
        except ModelLoadError as e:
            raise ModelLoadError(f"judge: {e}") from None
        common = dict(revision=self.revision, trust_remote_code=self.trust_remote_code, **kwargs)
        try:
            tok_kwargs = common if self.tokenizer_name is None else dict(trust_remote_code=self.trust_remote_code)
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name or name, **tok_kwargs)
            model = AutoModelForSequenceClassification.from_pretrained(name, dtype=DTYPES[self.dtype], **common)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"judge: could not load the reward model {name!r}: {e}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval()
        fmt = self.input_format
        if fmt in ("auto", "dpo_cli"):
            self.saved = read(name, revision=self.revision, **kwargs)
        if fmt == "auto":
            fmt = FORMAT if self.saved else "chat" if getattr(self.tokenizer, "chat_template", None) else "text"
        self.format = fmt
        log.info("judge: reward model %s (%s inputs)", name, fmt)

    def _encode(self, prompts: list[Prompt], responses: list[str]) -> Any:
        tok = self.tokenizer
        if self.format == FORMAT:  # exactly as training built them: a padded batch, one row each
            batch = encode(tok, self.saved, prompts, responses, self.max_length)
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        limits = dict(truncation=True, max_length=self.max_length or MAX_LENGTH, padding=True, return_tensors="pt")
        if self.format == "pair":
            firsts = [p if isinstance(p, str) else conversation_text(p, "") for p in prompts]
            return tok(firsts, list(responses), **limits)
        if self.format == "chat":
            texts = [
                tok.apply_chat_template(as_messages(p, r), tokenize=False)
                for p, r in zip(prompts, responses, strict=True)
            ]
            return tok(texts, add_special_tokens=False, **limits)
        return tok([conversation_text(p, r) for p, r in zip(prompts, responses, strict=True)], **limits)

    @torch.no_grad()
    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        self.load()
        out: list[float] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[i : i + self.batch_size], responses[i : i + self.batch_size])
            logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits
            out.extend(logits[:, 0].float().tolist())
        return out
