"""Resumable checkpoints (checkpoints/step-N/) and the final Hugging Face model (final/).

A checkpoint holds everything accelerate tracks (model, optimizer, registered objects such as
the LR scheduler, every process's RNG states) plus trainer_state.json with the step and data
position. It is written under a temporary name and renamed when complete, so `latest` never
picks up a checkpoint that a crash cut short.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from dpo_cli.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first."""
    found = []
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / STATE_FILE).is_file():
                found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def save(accelerator: Any, run_dir: Path, step: int, state: dict, keep: int | None) -> Path:
    """Save the full training state after optimizer step `step`; keep the newest `keep`.

    Every process calls this: each writes its own RNG state, and sharded strategies (FSDP,
    DeepSpeed) gather through collectives inside save_state.
    """
    final = checkpoints_dir(run_dir) / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # all processes have written their part
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep is not None:
            for old in complete_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: None, `auto` (latest complete one in run_dir, if any),
    or an explicit checkpoint directory."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        if not found:
            log.warning(
                "train.resume=auto: no complete checkpoint in %s, starting from scratch "
                "(to continue an earlier run, pass its directory as hydra.run.dir)",
                checkpoints_dir(run_dir),
            )
            return None
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"train.resume={resume!r} is not a complete checkpoint (no {STATE_FILE}); "
            f"use train.resume=auto or a checkpoints/step-N directory"
        )
    return path


# Keys that may change between a run and its resume: they decide where things are written or
# how often, not what is computed.
RESUMABLE_CHANGES = (
    "train.resume",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "logger.progress",
    "logger.wandb",
    "data.cache_dir",  # where tokenized data is cached, not what it is
    "reference.cache_dir",  # where reference log-probs are cached, not what they are
    "export",  # what final/ holds, written after the last step
    "inspect",
)


def settings(cfg: Any) -> dict[str, Any]:
    """The resolved config as flat `key: value` pairs, without the keys a resume may change."""
    from omegaconf import OmegaConf

    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if prefix.rstrip(".") in RESUMABLE_CHANGES:
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix.rstrip(".")] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def added_default(key: str, settings: dict[str, Any]) -> Any:
    """The default of a setting that a later version added, or a sentinel when there is none.

    A loss parameter's default is its class's (the `_target_` beside it in `settings`); any
    other key's comes from the config schema. A checkpoint written before the key existed
    computed exactly what that default computes, so resuming with the default is safe.
    """
    import inspect

    from dpo_cli import config

    node, _, name = key.rpartition(".")
    target = settings.get(f"{node}._target_")
    if target is not None:
        try:
            param = inspect.signature(config.import_target(str(target))).parameters.get(name)
        except (ImportError, AttributeError, ValueError):
            param = None
        return param.default if param is not None else _NO_DEFAULT
    return config.schema_default(key, _NO_DEFAULT)


_NO_DEFAULT = object()


def check_compatible(path: Path, expected: dict) -> None:
    """Refuse to resume from `path` when anything that decides the computation (the config
    apart from RESUMABLE_CHANGES, the run length, the tokenized training data) has changed.
    Keys the checkpoint predates are fine while they keep their defaults (`added_default`)."""
    state = json.loads((path / STATE_FILE).read_text())
    changed = [
        f"{k}: {state.get(k)!r} -> {v!r}"
        for k, v in expected.items()
        if (state[k] != v if k in state else added_default(k, expected) != v)
    ]
    if changed:
        raise UserError(
            f"cannot resume from {path}: the run has changed since it was written ({'; '.join(changed)}); "
            "resume with the same settings and data, or start a new run directory"
        )


def load(accelerator: Any, path: Path) -> dict:
    """Restore the state saved by `save` and return its trainer_state.json."""
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


def save_final(accelerator: Any, model: Any, tokenizer: Any, out_dir: Path, merge_lora: bool = False) -> None:
    """The trained policy in Hugging Face format, loadable with from_pretrained: the whole
    model, or under LoRA the adapter (adapter_config.json + weights, for peft's
    from_pretrained) and, with `merge_lora`, the merged model in out_dir/merged. An adapter
    over a randomly initialised base also gets that base in out_dir/base, which its
    adapter_config.json names, since no hub id or directory holds it. Call this last: merging
    folds the adapter into the model's weights in place."""
    state_dict = accelerator.get_state_dict(model)  # gathers sharded weights; every process calls
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        adapter = hasattr(unwrapped, "peft_config")
        if adapter:
            _point_adapter_at_base(unwrapped, tokenizer, out_dir / "base")
        unwrapped.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        log.info("saved final %s to %s", "LoRA adapter" if adapter else "model", out_dir)
        if adapter and merge_lora:
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(out_dir / "merged", safe_serialization=True)
            tokenizer.save_pretrained(out_dir / "merged")
            log.info("saved the merged model (base + adapter) to %s", out_dir / "merged")
    accelerator.wait_for_everyone()


def _point_adapter_at_base(peft_model: Any, tokenizer: Any, base_dir: Path) -> None:
    """Make the adapter's base_model_name_or_path loadable from anywhere: a local directory
    becomes absolute; a random-init base (no name) is saved to `base_dir` and named."""
    import os

    config = peft_model.peft_config["default"]
    name = config.base_model_name_or_path
    if name is not None:
        if os.path.isdir(os.path.expanduser(name)):
            config.base_model_name_or_path = str(Path(name).expanduser().resolve())
        return
    # The base weights without the adapter layers: peft keeps each wrapped layer's own weight
    # as `<layer>.base_layer.<param>`.
    base = peft_model.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    base.save_pretrained(base_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(base_dir)
    config.base_model_name_or_path = str(base_dir.resolve())
