"""Pairs of text -> token ids as the model sees them, truncated to fit, degenerate pairs dropped."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Any

from dpo_cli.batch import CHOSEN, REJECTED, RESPONSE_ROLES, ROLE_NAMES
from dpo_cli.data.chat import NOT_A_PREFIX
from dpo_cli.errors import DataError

# A tokenized example, paired or not, has one shape: the prompt's ids and its responses' ids
# by role, {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]} (RESPONSE_KEYS).
# A pair holds both roles; an unpaired (KTO) example one, CHOSEN if its completion is
# desirable, REJECTED if not, and no ids ([]) for the other. Every example holds every key, so
# that the tokenization cache stores them as columns (`prepare._pack`). Later stages read
# `responses_by_role` and never ask which kind of data they hold.
Tokenized = dict[str, Any]
RESPONSE_KEYS = {role: f"{ROLE_NAMES[role]}_ids" for role in RESPONSE_ROLES}
# Per-example values a pair may carry beside its ids, from the normalized pair to the batch
# (`collate`): `margin`, data=pairs' per-pair margin (a float), which task=reward's loss reads.
# An example holds one only when its pair did (the cache stores a missing one as NaN).
EXTRAS = ("margin",)

# Why a pair or an example is dropped (keys of TruncationStats.dropped).
IDENTICAL = "identical chosen and rejected"
IDENTICAL_AFTER_TRUNCATION = "identical after truncation"
NO_RESPONSE_TOKENS = "no response tokens after truncation"
NO_COMPLETION_TOKENS = "no completion tokens after truncation"

# What to do about each reason, for check_kept's message.
_FIXES = {
    IDENTICAL: "remove pairs with the same chosen and rejected response from the dataset",
    IDENTICAL_AFTER_TRUNCATION: "raise data.max_length (or lower data.max_prompt_length) so the responses' differences fit",
    NO_RESPONSE_TOKENS: "raise data.max_length or lower data.max_prompt_length to leave room for the responses",
    NO_COMPLETION_TOKENS: "raise data.max_length or lower data.max_prompt_length to leave room for the completions",
    NOT_A_PREFIX: (
        "use a chat template whose generation prompt opens the assistant turn as a finished "
        "conversation does (data.chat_template=FILE)"
    ),
}


def make_example(prompt: list[int], responses: dict[int, list[int]]) -> Tokenized:
    """A tokenized example: `prompt`'s ids and `responses` (role -> ids) under RESPONSE_KEYS,
    no ids for a role it does not hold.

    >>> make_example([1, 10], {REJECTED: [30, 2]})
    {'prompt_ids': [1, 10], 'chosen_ids': [], 'rejected_ids': [30, 2]}
    """
    return {"prompt_ids": prompt, **{key: responses.get(role, []) for role, key in RESPONSE_KEYS.items()}}


def responses_by_role(example: Tokenized) -> dict[int, list[int]]:
    """The responses `example` holds, role -> ids, in role order (RESPONSE_ROLES): both of a
    pair, the one of an unpaired example. A role with no ids, or no key, is not held
    (tokenization drops responses truncated to nothing, so a held response is never empty).

    >>> responses_by_role({"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [30, 2]})
    {1: [30, 2]}
    """
    return {role: ids for role, key in RESPONSE_KEYS.items() if (ids := example.get(key))}


@dataclass
class TruncationStats:
    """Counts over one call of `tokenize_pairs`."""

    prompts: int = 0  # pairs whose prompt was cut
    responses: int = 0  # pairs whose responses were cut
    boundary_fallbacks: int = 0  # responses tokenized alone: prompt + response merged across the boundary
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> pairs (or examples) left out


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
    """Fit prompt + the longer response into `max_length` tokens, in two steps.

    1. Only if the pair is too long (prompt + longer response > `max_length`) and the prompt is
       longer than `max_prompt_length`, the prompt is cut to `max_prompt_length` tokens: its end
       when `keep_end` (in dialogues the last turns matter), keeping a leading `bos_id`, or else
       its start. A prompt within `max_prompt_length` is never cut.
    2. If the pair is still too long, both responses are cut to the `max_length - len(prompt)`
       tokens the prompt leaves (a shorter response is left as it is), so the EOS may go; to
       none when the prompt alone fills `max_length` (only if `max_prompt_length >= max_length`,
       which the config refuses).

    This is not the original DPO code's rule, which cuts responses to
    `max_length - max_prompt_length` even when the prompt is shorter than that: here a short
    prompt leaves its unused room to the responses. Nothing is cut when the pair fits, and
    nothing is dropped (`tokenize_pairs` drops pairs left degenerate). `stats` counts pairs
    whose prompt (step 1) and responses (step 2) were cut.

    A 3-token prompt within max_prompt_length=6 gives 8-token responses 10 - 3 = 7 tokens (the
    original rule would give them 10 - 6 = 4):

    >>> truncate([1, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27], [30, 31, 2], 10, 6, True, 1)
    {'prompt_ids': [1, 10, 11], 'chosen_ids': [20, 21, 22, 23, 24, 25, 26], 'rejected_ids': [30, 31, 2]}

    A 9-token prompt is cut to BOS + its last 3 tokens, then the responses to the 7 - 4 = 3 left:

    >>> truncate([1, 10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 2], [30, 2], 7, 4, True, 1)
    {'prompt_ids': [1, 15, 16, 17], 'chosen_ids': [20, 21, 22], 'rejected_ids': [30, 2]}
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
        room = max(max_length - len(prompt), 0)
        chosen, rejected = chosen[:room], rejected[:room]
    return make_example(prompt, {CHOSEN: chosen, REJECTED: rejected})


def _suffix_length(tokenizer: Any) -> int:
    """How many special tokens the tokenizer puts after every text (EOS for some, none for most
    causal LMs): they belong after the response, not between prompt and response."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def _encode(tokenizer: Any, texts: list[str], special: list[bool]) -> list[list[int]]:
    """Each text's ids, with the tokenizer's special tokens (BOS) where `special` says: not for
    chat-templated text, which holds its own. Two batched calls at most; order kept."""
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        where = [i for i, s in enumerate(special) if s == flag]
        if where:
            ids = tokenizer([texts[i] for i in where], add_special_tokens=flag)["input_ids"]
            for i, one in zip(where, ids, strict=True):
                out[i] = one
    return out


def _responses(
    tokenizer: Any,
    prompts: list[str],
    prompt_ids: list[list[int]],
    responses: list[str],
    stats: TruncationStats,
    templated: list[bool],
) -> list[list[int]]:
    """Each response's ids as they occur in tokenize(prompt + response), ending with one EOS
    (plain text), or as the chat template ends it (templated: no special tokens added).

    Tokenizing a response alone is not what the model sees: SentencePiece tokenizers on the
    legacy path (Llama-2, Mistral v0.1) prepend "▁" to every text they are given, so a response
    alone would start with a piece that never follows the prompt at inference. Taking the
    response as what follows the prompt's ids in the whole is exact whenever the whole starts
    with the prompt's ids; where a token merges across the boundary it does not, and that
    response is tokenized alone (counted in `stats.boundary_fallbacks`).
    """
    eos = tokenizer.eos_token_id
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    wholes = _encode(tokenizer, texts, [not t for t in templated])
    out = []
    for text, prompt, whole, chat in zip(responses, prompt_ids, wholes, templated, strict=True):
        if whole[: len(prompt)] == prompt:
            ids = whole[len(prompt) :]
        else:
            stats.boundary_fallbacks += 1
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        # EOS ends every response so the model learns where to stop (once, if the tokenizer put
        # one); a chat template ends the turn itself (its end-of-turn token is what stops generation).
        out.append(ids if chat or (ids and ids[-1] == eos) else ids + [eos])
    return out


def tokenize_pairs(
    pairs: list[dict[str, str]],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    templated: bool = False,
) -> tuple[list[Tokenized], TruncationStats]:
    """Token ids for each pair (or unpaired example), in order, and counts of what was done.

    The prompt gets the tokenizer's leading special tokens (e.g. BOS); each response is taken
    from the prompt + response text tokenized together (see `_responses`) and ends with EOS.
    Chat-templated text (`templated`, or a pair marked `"templated": True` by `chat.render`)
    already holds its special tokens: it is tokenized without adding any (no second BOS) and
    gets no EOS after the template's own end of turn.
    Then `truncate` fits each pair into `max_length`. Pairs that would teach nothing are left
    out and counted by reason in `stats.dropped`: identical chosen and rejected ids, before or
    after truncation (their loss is log 2 whatever the model does), or a response truncated to
    nothing; unpaired examples whose completion was truncated to nothing. `check_kept` refuses
    data that is mostly dropped. A pair's `EXTRAS` (its margin) go to its tokenized example.
    """
    stats = TruncationStats()
    if not pairs:
        return [], stats
    texts = [p["prompt"] for p in pairs]
    chat = [templated or bool(p.get("templated")) for p in pairs]
    prompts = _encode(tokenizer, texts, [not c for c in chat])
    suffix = _suffix_length(tokenizer)
    if suffix:  # e.g. a trailing EOS: the model sees it after the response, not after the prompt
        prompts = [p if c else p[: len(p) - suffix] for p, c in zip(prompts, chat, strict=True)]
    keep_end = truncation_mode == "keep_end"
    bos = tokenizer.bos_token_id
    out: list[Tokenized] = []

    def drop(reason: str) -> None:
        stats.dropped[reason] = stats.dropped.get(reason, 0) + 1

    if "completion" in pairs[0]:  # unpaired text: each completion becomes a response of its label's role
        completions = _responses(tokenizer, texts, prompts, [p["completion"] for p in pairs], stats, chat)
        for p, c, row in zip(prompts, completions, pairs, strict=True):
            t = truncate(p, c, [], max_length, max_prompt_length, keep_end, bos, stats)
            if not t["chosen_ids"]:
                drop(NO_COMPLETION_TOKENS)
                continue
            out.append(make_example(t["prompt_ids"], {CHOSEN if row["label"] else REJECTED: t["chosen_ids"]}))
        return out, stats
    chosen = _responses(tokenizer, texts, prompts, [p["chosen"] for p in pairs], stats, chat)
    rejected = _responses(tokenizer, texts, prompts, [p["rejected"] for p in pairs], stats, chat)
    for p, c, r, pair in zip(prompts, chosen, rejected, pairs, strict=True):
        if c == r:
            drop(IDENTICAL)
            continue
        t = truncate(p, c, r, max_length, max_prompt_length, keep_end=keep_end, bos_id=bos, stats=stats)
        if not t["chosen_ids"] or not t["rejected_ids"]:
            drop(NO_RESPONSE_TOKENS)
        elif t["chosen_ids"] == t["rejected_ids"]:
            drop(IDENTICAL_AFTER_TRUNCATION)
        else:
            out.append(t | {k: pair[k] for k in EXTRAS if k in pair})
    return out, stats


def check_kept(n_in: int, stats: TruncationStats, what: str) -> None:
    """Raise DataError when `tokenize_pairs` dropped more than half of the `n_in` pairs (or
    examples) it was given, `what` naming them in the message ("training pairs"): a run on what
    is left would mostly measure the data problem. The message gives the count per reason and
    the fix."""
    dropped = sum(stats.dropped.values())
    if 2 * dropped <= n_in:
        return
    reasons = sorted(stats.dropped.items(), key=lambda kv: -kv[1])
    counts = ", ".join(f"{reason}: {n}" for reason, n in reasons)
    fixes = "; ".join(dict.fromkeys(_FIXES.get(reason, "check the data") for reason, _ in reasons))
    raise DataError(f"{dropped} of {n_in} {what} dropped ({counts}), {n_in - dropped} left; {fixes}")


def example_length(example: Tokenized) -> int:
    """Tokens an example puts in a batch with its prompt shared: prompt + every response it
    holds; what length-aware batching sorts by."""
    return len(example["prompt_ids"]) + sum(len(ids) for ids in responses_by_role(example).values())


def fingerprint(pairs: list[Tokenized]) -> str:
    """A short hash of the token ids of `pairs`, in order: equal only for the same data,
    tokenizer and truncation (checked when a run resumes)."""
    h = hashlib.sha256()
    for p in pairs:
        held = responses_by_role(p)
        parts = [p["prompt_ids"], *held.values()]
        if len(held) < len(RESPONSE_ROLES):
            # Which role it holds, hashed as the unpaired examples' label (1 desirable) before
            # examples had roles: the same data keeps its fingerprint, so a run resumes across.
            parts.append([int(CHOSEN in held)])
        for ids in parts:
            h.update(array("q", ids).tobytes())
            h.update(b"|")
        for key in EXTRAS:  # only when held: data without them keeps its fingerprint
            if key in p:
                h.update(f"{key}={p[key]!r}|".encode())
    return h.hexdigest()[:16]
