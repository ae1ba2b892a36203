"""Config -> tokenized training and evaluation data: the whole data stage in one call, shared
by training and the preflight (`mode=inspect`), so that both see exactly the same examples.

Tokenized data is cached on disk (`data.cache_dir`), keyed by a fingerprint of the normalized
pairs, the tokenizer and every setting that changes the ids, so a second run on the same data
(a sweep, a resume, the preflight then the run) skips tokenization.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpo_cli.data import Pair, Pairs, chat, load_pairs, tokenize
from dpo_cli.data.options import DataConfig, is_mixture, unpaired
from dpo_cli.data.tokenize import EXTRAS, Tokenized, TruncationStats, check_kept, tokenize_pairs

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when tokenization changes what it produces for the same inputs
CHUNK = 20_000  # pairs per tokenizer call: the progress bar's step on large data


@dataclass
class Prepared:
    pairs: Pairs  # the normalized text pairs (or unpaired examples), and rows dropped when reading
    train: list[Tokenized]
    eval: list[Tokenized]
    train_stats: TruncationStats
    eval_stats: TruncationStats
    unit: str  # "pairs", or "examples" for unpaired data
    cached: bool = False  # the token ids came from the cache
    n_train: int = 0  # normalized training pairs, before rendering and tokenizing
    eval_pairs: list = dataclasses.field(default_factory=list)  # the normalized eval pairs, before rendering


def _tokenize(pairs: list[Pair], tokenizer: Any, lengths: dict[str, Any], what: str) -> tuple[list, TruncationStats]:
    """tokenize_pairs over chunks, with a progress bar when there is more than one."""
    if len(pairs) <= CHUNK:
        return tokenize_pairs(pairs, tokenizer, **lengths)
    out: list[Tokenized] = []
    total = TruncationStats()
    for start in tqdm(range(0, len(pairs), CHUNK), desc=f"tokenizing {what}", unit="chunk"):
        part, stats = tokenize_pairs(pairs[start : start + CHUNK], tokenizer, **lengths)
        out += part
        total.prompts += stats.prompts
        total.responses += stats.responses
        total.boundary_fallbacks += stats.boundary_fallbacks
        for reason, n in stats.dropped.items():
            total.dropped[reason] = total.dropped.get(reason, 0) + n
    return out, total


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in a tokenizer that decides token ids: its serialized model (fast
    tokenizers) or vocabulary, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    )
    special = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    h.update(json.dumps([*special, getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()[:16]


def _code_version() -> str:
    """A hash of the modules that decide token ids, so that changing them misses old caches."""
    return hashlib.sha256(Path(tokenize.__file__).read_bytes() + Path(chat.__file__).read_bytes()).hexdigest()[:16]


def _cache_key(pairs: Pairs, template: str | None, tokenizer: Any, lengths: dict[str, Any]) -> str:
    h = hashlib.sha256()
    fingerprint = [CACHE_VERSION, _code_version(), lengths, tokenizer_fingerprint(tokenizer), template]
    h.update(json.dumps(fingerprint).encode())
    for split in (pairs.train, pairs.eval):
        for pair in split:
            h.update(json.dumps(pair, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"|split|")
    return h.hexdigest()[:24]


def _pack(examples: list[Tokenized]) -> dict[str, Any]:
    """Examples as flat tensors (values and lengths per key of ids, int32; a float extra such
    as `margin` as float64, NaN where an example holds none): torch.load reads tensors at disk
    speed, while nested Python lists go through its slow safe unpickler."""
    if not examples:
        return {}
    packed = {}
    for key, first in examples[0].items():
        if isinstance(first, list):
            packed[f"{key}/lengths"] = torch.tensor([len(e[key]) for e in examples], dtype=torch.int32)
            packed[f"{key}/values"] = torch.tensor([t for e in examples for t in e[key]], dtype=torch.int32)
    for key in EXTRAS:
        if any(key in e for e in examples):
            packed[key] = torch.tensor([float(e.get(key, math.nan)) for e in examples], dtype=torch.float64)
    return packed


def _unpack(packed: dict[str, Any]) -> list[Tokenized]:
    columns: dict[str, list] = {}
    for name, tensor in packed.items():
        key, _, part = name.partition("/")
        if not part:
            columns[key] = tensor.tolist()
        elif part == "lengths":
            values, lengths = packed[f"{key}/values"].tolist(), tensor.tolist()
            ends = list(itertools.accumulate(lengths))
            columns[key] = [values[end - n : end] for n, end in zip(lengths, ends, strict=True)]
    n = len(next(iter(columns.values()))) if columns else 0
    rows = [{key: col[i] for key, col in columns.items()} for i in range(n)]
    for row in rows:  # an extra an example did not hold (NaN) is left out again
        for key in EXTRAS:
            if key in row and math.isnan(row[key]):
                del row[key]
    return rows


def _load_cached(path: Path) -> tuple[list, list, TruncationStats, TruncationStats] | None:
    try:
        saved = torch.load(path, weights_only=True)  # tensors and plain containers only: no code runs
        return (
            _unpack(saved["train"]),
            _unpack(saved["eval"]),
            TruncationStats(**saved["train_stats"]),
            TruncationStats(**saved["eval_stats"]),
        )
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file is a cache miss, not a failure
        log.warning("ignoring the unreadable tokenization cache %s (%s); tokenizing again", path, e)
        return None


def _save_cached(path: Path, train: list, evals: list, ts: TruncationStats, es: TruncationStats) -> None:
    """Write the cache; a cache that cannot be written (read-only home on a cluster) only costs
    the next run its tokenization, so it is a warning, not a failure."""
    stats = {"train_stats": dataclasses.asdict(ts), "eval_stats": dataclasses.asdict(es)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"train": _pack(train), "eval": _pack(evals), **stats}, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is for every run that can read it
        os.replace(tmp, path)  # atomic: another process never reads half a file
    except OSError as e:
        log.warning(
            "could not write the tokenization cache %s (%s); set data.cache_dir to a writable directory", path, e
        )


def _degenerate_when_read(pairs: Pairs) -> dict[str, int]:
    """Rows a format already dropped as identical (conversations, TL;DR summaries, SHP comments):
    they count towards refusing mostly degenerate data like pairs found identical later."""
    return {reason: n for reason, n in pairs.dropped.get("train", {}).items() if "identical" in reason}


def prepare(data: DataConfig, tokenizer: Any, seed: int, check: bool = True, need_text: bool = False) -> Prepared:
    """Read, normalize, render (chat templates) and tokenize `data` (the config's data section).

    With `check`, refuse data that is mostly degenerate (identical responses, before or after
    truncation), which would train at a constant loss; the preflight reports it instead. On a
    cache hit, rendering is skipped too unless `need_text` (an export of the rendered text).
    """
    pairs = load_pairs(data, seed)
    warn_about_eval(data, pairs)
    n_train = len(pairs.train)
    eval_pairs = list(pairs.eval)
    template = chat.load_template(data.chat_template) if data.chat_template else None
    lengths = dict(
        max_length=data.max_length, max_prompt_length=data.max_prompt_length, truncation_mode=data.truncation_mode
    )
    cache_dir = data.cache_dir
    key = _cache_key(pairs, template, tokenizer, lengths) if cache_dir else ""
    path = Path(cache_dir).expanduser() / f"{key}.pt" if cache_dir else None
    cached = _load_cached(path) if path is not None and path.is_file() else None
    if cached is None or need_text:
        # Conversational pairs become text with the chat template; a pair whose templated
        # prompt is not a prefix of its templated conversation is dropped (and counted) here.
        pairs.train, dropped_train = chat.render(pairs.train, tokenizer, template)
        pairs.eval, dropped_eval = chat.render(pairs.eval, tokenizer, template)
    if cached is not None:
        train, evals, train_stats, eval_stats = cached
        log.info("tokenized data from the cache: %s", path)
    else:
        train, train_stats = _tokenize(pairs.train, tokenizer, lengths, "train")
        evals, eval_stats = _tokenize(pairs.eval, tokenizer, lengths, "eval")
        for stats, dropped in ((train_stats, dropped_train), (eval_stats, dropped_eval)):
            for reason, n in dropped.items():
                stats.dropped[reason] = stats.dropped.get(reason, 0) + n
        if path is not None:
            _save_cached(path, train, evals, train_stats, eval_stats)
    unit = "examples" if unpaired(data) else "pairs"
    prepared = Prepared(pairs, train, evals, train_stats, eval_stats, unit, cached is not None, n_train, eval_pairs)
    if check:
        check_prepared(prepared)
    return prepared


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(os.path.expanduser(a), os.path.expanduser(b))
    except OSError:  # not both there: the reader has said so
        return False


def warn_about_eval(data: DataConfig, pairs: Pairs) -> None:
    """One WARNING line each for held-out metrics that would mislead or not exist: data.eval_path
    naming the training file itself (under any spelling), and no held-out pairs at all, which
    training accepts (eval_every then evaluates nothing; generation evaluation refuses it)."""
    path, eval_path = data.path, data.eval_path
    if path is not None and eval_path is not None and _same_file(path, eval_path):
        log.warning(
            "data.eval_path=%r is the training file data.path=%r: the held-out metrics would be measured on "
            "training pairs; point data.eval_path at other pairs, or remove it to hold data.eval_holdout pairs out",
            eval_path,
            path,
        )
    if pairs.eval:
        return
    unit = "examples" if unpaired(data) else "pairs"
    holdout, total = data.eval_holdout, len(pairs.train)
    if is_mixture(data):
        why = "no source of data.mixture holds any out"
    else:
        why = "data.eval_holdout=0" if not holdout else f"data.eval_holdout={holdout} of {total} {unit}"
    log.warning(
        "no held-out %s (%s): held-out evaluation (eval_loss, eval_rewards/*) is skipped; set data.eval_holdout=N "
        "or data.eval_path=FILE to evaluate",
        unit,
        why,
    )


def check_prepared(p: Prepared) -> None:
    """Refuse data that is mostly degenerate, counting pairs dropped as identical when read."""
    read = _degenerate_when_read(p.pairs)
    combined = dataclasses.replace(p.train_stats, dropped={**p.train_stats.dropped, **read})
    check_kept(p.n_train + sum(read.values()), combined, f"training {p.unit}")
