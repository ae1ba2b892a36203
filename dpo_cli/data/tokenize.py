"""Pairs of text -> token ids, with the truncation rules of the original DPO code."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Any

# A tokenized pair {prompt_ids, chosen_ids, rejected_ids}, or an unpaired example
# {prompt_ids, completion_ids, label} (label 1 = desirable, 0 = undesirable).
Tokenized = dict[str, Any]


@dataclass
class TruncationStats:
    prompts: int = 0
    responses: int = 0


def truncate(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    max_prompt_length: int,
    keep_end: bool,
    bos_id: int | None,
    stats: TruncationStats | None = None,
) -> Tokenized:
    """Fit prompt + the longer response into `max_length` tokens.

    First the prompt is cut to `max_prompt_length` (keeping its end for dialogues, where the
    last turns matter, or its start), keeping a leading BOS token; then, if still too long,
    both responses are cut to what is left. Nothing is cut when the pair already fits.
    """
    stats = stats if stats is not None else TruncationStats()
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
        stats.prompts += 1
        if not keep_end:
            prompt = prompt[:max_prompt_length]
        elif bos_id is not None and prompt[0] == bos_id:
            prompt = [bos_id] + prompt[len(prompt) - max_prompt_length + 1 :]
        else:
            prompt = prompt[len(prompt) - max_prompt_length :]
    if len(prompt) + longer > max_length:
        stats.responses += 1
        room = max_length - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def tokenize_pairs(
    pairs: list[dict[str, str]],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
) -> tuple[list[Tokenized], TruncationStats]:
    """Token ids for each pair: the prompt with the tokenizer's special tokens (e.g. BOS),
    each response without them and ending with EOS so the model learns where to stop."""
    stats = TruncationStats()
    if not pairs:
        return [], stats
    prompts = tokenizer([p["prompt"] for p in pairs], add_special_tokens=True)["input_ids"]
    eos = [tokenizer.eos_token_id]
    keep_end = truncation_mode == "keep_end"
    if "completion" in pairs[0]:  # unpaired examples: truncated like a pair of two equal responses
        completions = tokenizer([p["completion"] for p in pairs], add_special_tokens=False)["input_ids"]
        out = []
        for p, c, row in zip(prompts, completions, pairs, strict=True):
            t = truncate(p, c + eos, [], max_length, max_prompt_length, keep_end, tokenizer.bos_token_id, stats)
            out.append({"prompt_ids": t["prompt_ids"], "completion_ids": t["chosen_ids"], "label": int(row["label"])})
        return out, stats
    chosen = tokenizer([p["chosen"] for p in pairs], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([p["rejected"] for p in pairs], add_special_tokens=False)["input_ids"]
    out = [
        truncate(
            p,
            c + eos,
            r + eos,
            max_length,
            max_prompt_length,
            keep_end=keep_end,
            bos_id=tokenizer.bos_token_id,
            stats=stats,
        )
        for p, c, r in zip(prompts, chosen, rejected, strict=True)
    ]
    return out, stats


def fingerprint(pairs: list[Tokenized]) -> str:
    """A short hash of the token ids of `pairs`, in order: equal only for the same data,
    tokenizer and truncation (checked when a run resumes)."""
    h = hashlib.sha256()
    for p in pairs:
        keys = (
            ("prompt_ids", "chosen_ids", "rejected_ids")
            if "chosen_ids" in p
            else ("prompt_ids", "completion_ids", "label")
        )
        for key in keys:
            value = p[key]
            h.update(array("q", value if isinstance(value, list) else [value]).tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]
