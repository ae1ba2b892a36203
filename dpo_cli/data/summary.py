"""What the data becomes: the preflight report (`mode=inspect`, and the start of training) and
the export of the normalized pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dpo_cli.batch import ROLE_NAMES
from dpo_cli.data.prepare import Prepared
from dpo_cli.data.tokenize import Tokenized, responses_by_role
from dpo_cli.errors import DataError

PERCENTILES = (50, 90, 99, 100)


def _percentiles(values: list[int]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    # Nearest rank: the smallest value with at least p% of the values at or below it.
    picks = [ordered[max(0, math.ceil(p * len(ordered) / 100) - 1)] for p in PERCENTILES]
    return " ".join(f"p{p}={v}" for p, v in zip(PERCENTILES, picks, strict=True)).replace("p100", "max")


def _responses(example: Tokenized) -> list[tuple[str, list[int]]]:
    """(role name, ids) of each response the example holds: an unpaired example's desirable
    completion is its chosen response, an undesirable one its rejected response."""
    return [(ROLE_NAMES[role], ids) for role, ids in responses_by_role(example).items()]


def render_example(example: Tokenized, tokenizer: Any) -> str:
    """One tokenized example as text, with the prompt/response boundary made visible."""

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    lines = [f"  [prompt]{text(example['prompt_ids'])}[/prompt]"]
    lines += [f"  [{name}]{text(ids)}[/{name}]" for name, ids in _responses(example)]
    return "\n".join(lines)


def report(data: Prepared, tokenizer: Any, batch_size: int, n_examples: int = 3) -> str:
    """The data report: rows read and kept, drops by reason, token-length percentiles, the
    truncated share, tokens and steps per epoch, and a few examples with their boundaries."""
    train = data.train
    rows = data.pairs.rows
    # Normalized pairs, counted before chat rendering (which a tokenization-cache hit skips, so
    # that pairs it would drop are only known on a fresh run): the same figure either way.
    kept = data.n_train + len(data.eval_pairs)
    lines = [
        f"rows read: {', '.join(f'{k} {v}' for k, v in rows.items()) or 'generated'}; "
        f"{data.unit} kept: {len(train)} train, {len(data.eval)} eval (of {kept} normalized)",
        f"dropped when reading: {data.pairs.dropped or 'none'}",
        *(
            [f"sources: {', '.join(f'{n} {t} train / {e} eval' for n, (t, e) in data.pairs.sources.items())}"]
            if data.pairs.sources
            else []
        ),
        f"dropped after tokenizing: train {data.train_stats.dropped or 'none'}, eval {data.eval_stats.dropped or 'none'}",
    ]
    prompt_lens = [len(e["prompt_ids"]) for e in train]
    lines.append(f"prompt tokens: {_percentiles(prompt_lens)}")
    names = sorted({name for e in train for name, _ in _responses(e)})
    for name in names:
        lengths = [len(ids) for e in train for n, ids in _responses(e) if n == name]
        lines.append(f"{name} tokens: {_percentiles(lengths)}")
    s = data.train_stats
    n = max(len(train) + sum(s.dropped.values()), 1)  # the pairs given to the tokenizer
    lines.append(
        f"truncated: prompts {s.prompts} ({100 * s.prompts / n:.1f}%), responses {s.responses} "
        f"({100 * s.responses / n:.1f}%); responses tokenized apart from their prompt: {s.boundary_fallbacks}"
    )
    tokens = sum(len(e["prompt_ids"]) + len(ids) for e in train for _, ids in _responses(e))
    steps = len(train) // batch_size
    lines.append(
        f"training data: {tokens} tokens (prompt + response, every sequence); per epoch {steps} optimizer steps "
        f"of {batch_size} {data.unit} (train.batch_size)"
    )
    lines.append("token ids: " + ("from the tokenization cache" if data.cached else "tokenized now"))
    for i, example in enumerate(train[:n_examples]):
        lines.append(f"example {i + 1}:\n{render_example(example, tokenizer)}")
    return "\n".join(lines)


def export(data: Prepared, path: str, overwrite: bool = False) -> Path:
    """Write the normalized training and eval pairs (the text that is then tokenized) as JSONL:
    {"split", "prompt", "chosen", "rejected"} (or "completion", "label" for unpaired data).

    The config check refuses an existing file (and always the input); the file is still opened
    exclusively unless `overwrite`, so that one created meanwhile is not replaced either."""
    out = Path(path).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = out.open("w" if overwrite else "x")
    except FileExistsError:
        raise DataError(
            f"inspect.export={path!r} already exists; choose another file, or set inspect.overwrite=true"
        ) from None
    except OSError as e:
        raise DataError(f"inspect.export={path!r} cannot be written ({e.strerror}); choose another file") from None
    with f:
        for split, pairs in (("train", data.pairs.train), ("eval", data.pairs.eval)):
            for pair in pairs:
                text = {k: v for k, v in pair.items() if k != "templated"}
                f.write(json.dumps({"split": split, **text}, ensure_ascii=False) + "\n")
    return out
