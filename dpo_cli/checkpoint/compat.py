"""Whether a checkpoint may be resumed by this run's config: the settings that decide the
computation must not have changed since it was written (`check_compatible`)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from dpo_cli.checkpoint.store import STATE_FILE
from dpo_cli.data.options import recorded_format
from dpo_cli.errors import UserError
from dpo_cli.options import import_target
from dpo_cli.schema import Config, as_plain, renamed, schema_default

# Keys that may change between a run and its resume: they decide where things are written or
# how often, not what is computed.
RESUMABLE_CHANGES = (
    "train.resume",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.layout",  # how batches are laid out and scored, not what is computed (exact, see dpo_cli.layout)
    "train.logits_chunk",
    "train.compile",  # torch.compile of the same computation: rounding, not what is computed
    "model.attn_implementation",  # the attention kernel: rounding, not what is computed (its default became null)
    "logger.progress",
    "logger.report",  # whether report.png/report.html are drawn
    "logger.wandb",
    "logger.tensorboard",  # metric sinks: where rows go, not what is trained
    "logger.mlflow",
    "eval.harness",  # benchmarks run after the last step, not what is trained
    "logger.peak_tflops",  # only what mfu is divided by
    "data.cache_dir",  # where tokenized data is cached, not what it is
    "reference.cache_dir",  # where reference log-probs are cached, not what they are
    "export",  # what final/ holds, written after the last step
    "inspect",
    "eval",  # generation evaluation reads the weights, never changes them (the reference's samples are remade if due)
    "judge",
)


def settings(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat `key: value` pairs, without the keys a resume may change."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if prefix.rstrip(".") in RESUMABLE_CHANGES or prefix.endswith(".cache_dir."):  # a mixture source's too
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix.rstrip(".")] = node

    walk(as_plain(cfg), "")
    return flat


def migrated(recorded: dict[str, Any]) -> dict[str, Any]:
    """Settings an earlier version recorded, as this version records them: keys it spelled
    otherwise under their new names (`schema.RENAMED_KEYS`), and a data format recorded by name
    (`data.format: hh`) as the `_target_` of its class (a mixture's `mix`: no format)."""
    out: dict[str, Any] = {}
    for key, value in recorded.items():
        key = renamed(key)
        if (key == "data.format" or key.endswith(".format")) and isinstance(value, str):
            try:
                target = recorded_format(value)
            except ValueError:  # a format this version does not have: a difference, said as such
                target = value
            key, value = (f"{key}._target_", target) if target is not None else (key, None)
        out[key] = value
    return out


def added_default(key: str, settings: dict[str, Any]) -> Any:
    """The default of a setting that a later version added, or a sentinel when there is none.

    A loss parameter's default is its class's (the `_target_` beside it in `settings`), or that
    of a modifier the class accepts (`accepts`: ld_alpha, wpo, ...); any other key's comes from
    the config schema. A checkpoint written before the key existed computed exactly what that
    default computes, so resuming with the default is safe.
    """
    node, _, name = key.rpartition(".")
    if key.startswith("data.mixture.") and key.count(".") >= 3:  # a source's key: the data section's default
        return added_default("data." + key.split(".", 3)[3], settings)
    if node.endswith(".columns"):  # a format's source column: unset (null) is the field's own name
        return None
    target = settings.get(f"{node}._target_")
    if target is not None:
        try:
            cls = import_target(str(target))
        except (ImportError, AttributeError, ValueError):
            return _NO_DEFAULT
        for source in (cls, *getattr(cls, "accepts", ())):
            param = inspect.signature(source).parameters.get(name)
            if param is not None and param.kind is not param.VAR_KEYWORD:
                return param.default
        return _NO_DEFAULT
    return schema_default(key, _NO_DEFAULT)


_NO_DEFAULT = object()


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON would store them: a tuple default (AdamW's betas) equals a YAML list."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check_compatible(path: Path, expected: dict) -> None:
    """Refuse to resume from `path` when anything that decides the computation (the config
    apart from RESUMABLE_CHANGES, the run length, the tokenized training data) has changed.
    Keys the checkpoint predates are fine while they keep their defaults (`added_default`);
    keys it has that the config no longer has (removed by a later version) are ignored."""
    state = migrated(json.loads((path / STATE_FILE).read_text()))
    changed = []
    for k, v in expected.items():
        if k in state:
            if not _same(state[k], v):
                changed.append(f"{k}: {state[k]!r} -> {v!r}")
        elif not _same(default := added_default(k, expected), v):
            was = "no default" if default is _NO_DEFAULT else f"default {default!r}"
            changed.append(f"{k}: absent from the checkpoint ({was}) -> {v!r}")
    if changed:
        raise UserError(
            f"cannot resume from {path}: the run has changed since it was written ({'; '.join(changed)}); "
            "resume with the same settings and data, or start a new run directory"
        )
