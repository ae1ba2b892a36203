"""The resume policy: which checkpoint a run continues from, and what becomes of the others.

`train.resume=auto` takes the newest checkpoint whose files match their manifest (sizes, then
checksums) and says why it skipped any newer one; an explicit checkpoint must be good. Once a
run continues from step S, checkpoints of steps after S belong to an abandoned future: they
are set aside as abandoned-step-N, never deleted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dpo_cli.checkpoint.store import (
    checkpoints_dir,
    is_legacy,
    read_state,
    remove_stale_tmp,
    set_aside,
    step_dirs,
    verify,
)
from dpo_cli.distributed import on_main
from dpo_cli.errors import UserError

log = logging.getLogger(__package__)  # lines name the package (as before its split into modules)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: None; `auto`, the newest good one in run_dir (damaged or
    incomplete ones are skipped with a warning saying why); or an explicit checkpoint directory,
    which must be good (UserError naming the problem and the good alternatives otherwise).
    Stale step-N.tmp directories are removed first."""
    if resume is None:
        return None

    def decide() -> Path | None:
        remove_stale_tmp(run_dir)
        return _newest_good(run_dir) if resume == "auto" else _explicit(resume, run_dir)

    return on_main(decide)


def _newest_good(run_dir: Path) -> Path | None:
    found = step_dirs(checkpoints_dir(run_dir))
    skipped = []
    for _, path in reversed(found):
        problem = verify(path, checksums=True)
        if problem is None:
            _log_legacy(path)
            if skipped:
                log.warning("train.resume=auto: resuming from %s, the newest good checkpoint", path)
            return path
        log.warning("train.resume=auto: skipping damaged checkpoint %s: %s", path, problem)
        skipped.append(path)
    log.warning(
        "train.resume=auto: no %scheckpoint in %s, starting from scratch "
        "(to continue an earlier run, pass its directory as hydra.run.dir)",
        "good " if skipped else "",
        checkpoints_dir(run_dir),
    )
    return None


def _explicit(resume: str, run_dir: Path) -> Path:
    path = Path(resume).expanduser()
    problem = verify(path, checksums=True) if path.exists() else "it does not exist"
    if problem:
        others = _alternatives([path.parent, checkpoints_dir(run_dir)], exclude=path)
        raise UserError(f"train.resume={resume!r} cannot be resumed from: {problem}; {others}")
    _log_legacy(path)
    return path


def _log_legacy(path: Path) -> None:
    if is_legacy(path):
        log.info("%s was written before checkpoints had a manifest: accepted without a checksum check", path)


def _alternatives(dirs: list[Path], exclude: Path) -> str:
    """The good checkpoints in `dirs` other than `exclude`, newest first, for an error message."""
    roots = list(dict.fromkeys(d.resolve() for d in dirs))
    good = [d for root in roots for _, d in step_dirs(root) if verify(d, checksums=False) is None]
    good = [d for d in good if d != exclude.resolve()]
    if not good:
        return f"there is no other good checkpoint in {', '.join(str(d) for d in roots)}"
    return f"good checkpoints: {', '.join(str(d) for d in good[::-1])} (train.resume=auto takes the newest)"


def discard_future(run_dir: Path, step: int) -> list[Path]:
    """Set aside every checkpoint after `step` as checkpoints/abandoned-step-N (never deleted).

    When a run resumes from step S, checkpoints with a later step belong to a future that was
    abandoned (metrics.jsonl is cut back to S): left in place they would outrank the new ones
    in rotation and in train.resume=auto. Returns the new paths."""
    return set_aside(run_dir, step + 1, f"this run continues from step {step}")


def load(accelerator: Any, path: Path, run_dir: Path | None = None) -> dict:
    """Restore the state saved by `save` and return its trainer_state.json. With `run_dir`, the
    run continues from this step: checkpoints after it are set aside (`discard_future`).

    A checkpoint that verified but still fails inside accelerate (a file damaged in a way the
    manifest cannot see, or one from before manifests) is a UserError naming it."""
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # SafetensorError, pickle's, torch.load's: all "cannot read it"
        first = str(e).splitlines()[0] if str(e) else ""
        others = _alternatives([path.parent] + ([checkpoints_dir(run_dir)] if run_dir else []), exclude=path)
        raise UserError(
            f"cannot load checkpoint {path}: {type(e).__name__}: {first}; it is damaged or was not "
            f"written by this model and optimizer; {others}"
        ) from e
    state = read_state(path)
    if run_dir is not None:
        if accelerator.is_main_process:
            discard_future(run_dir, state["step"])
        accelerator.wait_for_everyone()
    log.info("resumed from %s (step %d)", path, state["step"])
    return state
