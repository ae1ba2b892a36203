"""Conversational data -> text, with the tokenizer's chat template.

A conversational pair holds lists of `{"role", "content"}` messages instead of strings:
`{prompt: [...], chosen: [...], rejected: [...]}` (or an unpaired `{prompt, completion, label}`),
the prompt being the conversation so far and each response the assistant's reply. `render`
turns such a pair into the strings the model sees:

    prompt   = template(prompt messages, add_generation_prompt=True)
    response = template(prompt messages + response messages)[len(prompt):]

so prompt + response is exactly the conversation as the template writes it, and the prompt ends
where the assistant's reply begins (with the generation prompt, as at inference). Some templates
break that: they render the last assistant turn differently from an earlier one (Qwen3 drops
earlier "<think>" blocks), or the generation prompt is not how a finished turn starts. Then the
prompt is not a prefix of the whole, and the loss would be computed on the wrong tokens: such
pairs are dropped and counted (`NOT_A_PREFIX`). The prompt must also be a prefix in tokens, not
only in characters, because the trainer splits the whole's token ids at the prompt's length.

Rendered pairs carry `"templated": True`: the template already holds the special tokens (BOS,
end of turn), so `tokenize.tokenize_pairs` adds none (no second BOS, no EOS after the template's
own end of turn). Text pairs pass through unchanged, without the key.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from dpo_cli.data.fields import RowError, field
from dpo_cli.errors import DataError

Message = dict[str, str]  # {"role": "user" | "assistant" | "system" | "tool", "content": str}
# The roles chat templates understand (transformers' convention). Another role (HH-style
# human/bot, ShareGPT's gpt) is a data problem, named with its row and field, not something
# to blame on the template, which renders it verbatim or refuses it in its own words.
ROLES = ("system", "user", "assistant", "tool")

NOT_A_PREFIX = "templated prompt is not a prefix of the templated conversation"
NO_TEMPLATE = "the tokenizer has no chat template; set data.chat_template=FILE (a Jinja template)"
RESPONSE_FIELDS = ("chosen", "rejected", "completion")
_CHUNK = 1024  # pairs tokenized per call for the token-prefix check


def messages(value: Any, name: str) -> list[Message]:
    """`value` as a list of {role, content} messages (other keys left out), or a RowError naming
    the field `name` and the first message that is not one."""
    if not isinstance(value, list):
        raise RowError(name, f"field {name!r} must be a list of {{role, content}} messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(
                name, f"field {name!r}: message {i + 1} must be a {{role, content}} object, got {type(m).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"a {type(m[key]).__name__}"
                raise RowError(name, f"field {name!r}: message {i + 1} needs a string {key!r}, got {got}")
        if m["role"] not in ROLES:
            raise RowError(
                name,
                f"field {name!r}: message {i + 1} has role {m['role']!r}; the roles are {', '.join(ROLES)} (rename "
                "the others in the data, e.g. human -> user, bot or gpt -> assistant)",
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def text_or_messages(row: dict, name: str) -> str | list[Message]:
    """Field `name` of the row: a string, or a validated list of messages."""
    value = field(row, name)
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        kind = type(value).__name__
        raise RowError(name, f"field {name!r} must be a string or a list of {{role, content}} messages, got {kind}")
    return messages(value, name)


def is_conversational(pair: dict) -> bool:
    return any(isinstance(pair.get(k), list) for k in ("prompt", *RESPONSE_FIELDS))


def load_template(path: str) -> str:
    """The text of the Jinja chat template file at `path` (data.chat_template), checked for
    syntax so that a broken file fails here and not once per row."""
    where = f"data.chat_template={path!r}"
    full = os.path.expanduser(path)
    if os.path.isdir(full):
        raise DataError(f"{where} is a directory; give the path of a Jinja template file")
    if not os.path.isfile(full):
        raise DataError(f"{where}: no such file; give the path of a Jinja chat template file")
    try:
        with open(full, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text; a chat template is a Jinja text file") from None
    if not text.strip():
        raise DataError(f"{where} is empty; it should hold a Jinja chat template")
    import jinja2  # here: it comes with transformers, and only chat templates need it
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # parsed as transformers does (its environment), without running it
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{where}: Jinja syntax error on line {e.lineno}: {e.message}") from None
    return text


def render(pairs: list[dict], tokenizer: Any, chat_template: str | None) -> tuple[list[dict], dict[str, int]]:
    """Conversational pairs (or unpaired examples) rendered as text with the chat template, and
    how many were dropped for each reason.

    `chat_template` is template text (see `load_template`); when given, it is used instead of the
    tokenizer's own. Text pairs are returned unchanged; rendered ones carry `"templated": True`.
    A pair is dropped when its templated prompt is not a prefix of its templated conversation,
    in characters or in tokens (`NOT_A_PREFIX`), or when the template refuses its messages
    (e.g. roles that do not alternate; the reason quotes the template's message). Order is kept.
    """
    if not any(is_conversational(p) for p in pairs):
        return pairs, {}
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(NO_TEMPLATE)
    import jinja2  # here, as in load_template: it comes with transformers, and only chat data needs it

    def apply(conversation: list[Message], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    dropped: Counter[str] = Counter()
    # First the strings, then one batched tokenization for the token-prefix checks.
    rendered: list[dict | None] = []
    for pair in pairs:
        if not is_conversational(pair):
            rendered.append(pair)
            continue
        prompt = pair["prompt"]
        if isinstance(prompt, str):  # a text prompt with message responses: the user's turn
            prompt = [{"role": "user", "content": prompt}]
        try:
            text = apply(prompt, True)
            wholes = {k: apply(prompt + pair[k], False) for k in RESPONSE_FIELDS if k in pair}
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"the chat template has a Jinja syntax error on line {e.lineno}: {e.message}") from None
        except jinja2.TemplateError as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            dropped[f"the chat template refused the messages: {why}"] += 1
            rendered.append(None)
            continue
        if not all(whole.startswith(text) for whole in wholes.values()):
            dropped[NOT_A_PREFIX] += 1
            rendered.append(None)
            continue
        out = {**pair, "prompt": text, "templated": True}
        out.update({k: whole[len(text) :] for k, whole in wholes.items()})
        rendered.append(out)

    # The trainer splits the whole's token ids at the prompt's length: check they agree there.
    bad = _not_token_prefixes([p for p in rendered if p is not None and p.get("templated")], tokenizer)
    if bad:
        dropped[NOT_A_PREFIX] += len(bad)
    return [p for p in rendered if p is not None and id(p) not in bad], dict(dropped)


def _not_token_prefixes(todo: list[dict], tokenizer: Any) -> set[int]:
    """The rendered pairs (by `id`) whose prompt's token ids are not a prefix of each whole
    conversation's, tokenizing in chunks (a batch is faster than one call per text; all at once
    holds every id)."""
    bad = set()
    for start in range(0, len(todo), _CHUNK):
        chunk = todo[start : start + _CHUNK]
        groups = [[p["prompt"]] + [p["prompt"] + p[k] for k in RESPONSE_FIELDS if k in p] for p in chunk]
        ids = iter(tokenizer([t for g in groups for t in g], add_special_tokens=False)["input_ids"])
        for p, group in zip(chunk, groups, strict=True):
            prompt, *wholes = [next(ids) for _ in group]
            if any(whole[: len(prompt)] != prompt for whole in wholes):
                bad.add(id(p))
    return bad
