"""The checkpoint store: checkpoints/step-N/ written whole or not at all, and verified.

A checkpoint holds everything accelerate tracks (model, optimizer, registered objects such as
the LR scheduler, every process's RNG states) plus trainer_state.json with the step and data
position. It is written under a temporary name (step-N.tmp); once every process's files are in
place, manifest.json (each file's path, size and sha256) is written last and the directory is
renamed. A checkpoint counts as complete only with its manifest, so a crash, a full disk or a
file damaged later is detected (`verify`) before anything is resumed from it. Rotation only
deletes older checkpoints once the new one is verified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dpo_cli.distributed import first_failure
from dpo_cli.errors import UserError
from dpo_cli.optimizers import state_bytes

log = logging.getLogger(__package__)  # lines name the package (as before its split into modules)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
# trainer_state.json's "checkpoint_format": 2 since checkpoints have a manifest. A checkpoint
# without the key was written before, and is accepted without a manifest (no checksums).
FORMAT = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
# Room asked for beyond the estimate: the estimate is the previous checkpoint's size (or the
# tensors' bytes), and the new one may be a little larger (pickled RNG and scheduler state,
# about 15 kB per process, and the files' headers: 0.9% on the tiny model). A fixed 64 MiB
# here asked 16 times a small model's checkpoint; 256 kB covers these for up to 16 processes.
SPACE_FACTOR, SPACE_SLACK = 1.1, 256 * 2**10


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every checkpoints/step-N directory in `root`, complete or not, by step."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir()]
    return sorted(found)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in `run_dir` whose files are all there at their manifest's sizes (or that
    predate manifests), oldest first. Checksums are left to `resolve_resume`: they read it all."""
    return [d for _, d in step_dirs(checkpoints_dir(run_dir)) if verify(d, checksums=False) is None]


# --- verification ------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def read_state(path: Path) -> dict:
    state = json.loads((path / STATE_FILE).read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("no integer 'step'")
    return state


def is_legacy(path: Path) -> bool:
    """Written before checkpoints had a manifest: trainer_state.json without checkpoint_format."""
    try:
        return not (path / MANIFEST_FILE).exists() and "checkpoint_format" not in read_state(path)
    except (OSError, ValueError):
        return False


def verify(path: Path, checksums: bool = True) -> str | None:
    """Why checkpoint `path` cannot be resumed from, or None when it can: every file in its
    manifest present at its size (and, with `checksums`, its sha256), trainer_state.json
    readable. A checkpoint from before manifests (`is_legacy`) passes on trainer_state.json."""
    if not path.is_dir():
        return "it is not a directory"
    has_manifest = (path / MANIFEST_FILE).is_file()
    if has_manifest:
        try:
            entries = json.loads((path / MANIFEST_FILE).read_text())["files"]
            problem = _check_files(path, entries, checksums)
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"{MANIFEST_FILE} is unreadable ({type(e).__name__}: {e})"
        if problem:
            return problem
    try:
        state = read_state(path)
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__}: {e})"
    if not has_manifest and "checkpoint_format" in state:
        return f"{MANIFEST_FILE} is missing (the checkpoint was not finished, or was damaged since)"
    return None


def _check_files(path: Path, entries: list[dict], checksums: bool) -> str | None:
    for e in entries:
        try:
            size = (path / e["path"]).stat().st_size
        except FileNotFoundError:
            return f"{e['path']} is missing"
        if size != e["size"]:
            how = "cut short" if size < e["size"] else "changed since"
            return f"{e['path']} has {size} bytes, its manifest says {e['size']} ({how})"
    for e in entries if checksums else ():
        if _sha256(path / e["path"]) != e["sha256"]:
            return f"{e['path']} does not match its sha256 checksum (its content changed since it was written)"
    return None


def _write_manifest(path: Path) -> None:
    """manifest.json for every file under `path`: written last, it marks the checkpoint complete."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = [{"path": str(p.relative_to(path)), "size": p.stat().st_size, "sha256": _sha256(p)} for p in files]
    with (path / MANIFEST_FILE).open("w") as f:
        json.dump({"files": entries}, f, indent=1)


def _size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def last_good(run_dir: Path) -> str:
    good = complete_checkpoints(run_dir)
    return str(good[-1]) if good else "none (no checkpoint has been saved in this run dir)"


# --- housekeeping: stale temporaries, checkpoints set aside --------------------------------------


def remove_stale_tmp(run_dir: Path) -> None:
    """Delete step-N.tmp directories: the unfinished saves of a run that was killed."""
    root = checkpoints_dir(run_dir)
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        if _TMP_DIR.match(d.name):
            log.warning("removing %s: an unfinished checkpoint of a run that stopped while saving", d)
            shutil.rmtree(d, ignore_errors=True)


def set_aside(run_dir: Path, first: int, why: str) -> list[Path]:
    """Rename checkpoints at step `first` and later to abandoned-step-N (-2, -3, ... if taken)."""
    moved = []
    for n, d in step_dirs(checkpoints_dir(run_dir)):
        if n < first:
            continue
        target = d.with_name(f"abandoned-{d.name}")
        k = 1
        while target.exists():
            k += 1
            target = d.with_name(f"abandoned-{d.name}-{k}")
        try:
            d.rename(target)
        except OSError as e:
            log.warning("could not set aside %s (%s): move it out of %s by hand", d, e, d.parent)
            continue
        log.warning(
            "%s is from an abandoned run (%s): renamed to %s; delete it when you no longer need it",
            d,
            why,
            target.name,
        )
        moved.append(target)
    return moved


# --- save --------------------------------------------------------------------------------------


def save(
    accelerator: Any,
    run_dir: Path,
    step: int,
    state: dict,
    keep: int | None,
    estimate_bytes: int | None = None,
) -> Path:
    """Save the full training state after optimizer step `step`; keep the newest `keep`.

    Every process calls this: each writes its own RNG state, and sharded strategies (FSDP,
    DeepSpeed) gather through collectives inside save_state. Before writing: stale step-N.tmp
    directories go, the free space is checked against `estimate_bytes` (default: the previous
    checkpoint's size, else the model's and optimizer's tensors), and checkpoints at this step
    or later (an abandoned future) are set aside. Rotation runs only once the new one is
    complete and verified. Raises UserError, with the partial step-N.tmp removed, when the disk
    is full or not writable.
    """
    failure = None
    if accelerator.is_main_process:
        try:
            _prepare(accelerator, run_dir, step, estimate_bytes)
        except UserError as e:
            failure = str(e)
    failure = first_failure(accelerator, failure)
    if failure:
        raise UserError(failure)
    final = _write(accelerator, run_dir, step, state)
    if accelerator.is_main_process:
        if keep is not None:
            _rotate(run_dir, keep, final)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _prepare(accelerator: Any, run_dir: Path, step: int, estimate_bytes: int | None) -> None:
    root = checkpoints_dir(run_dir)
    remove_stale_tmp(run_dir)
    if estimate_bytes is None:
        good = complete_checkpoints(run_dir)
        estimate_bytes = _size_of(good[-1]) if good else _tensor_bytes(accelerator)
    needed = int(estimate_bytes * SPACE_FACTOR) + SPACE_SLACK
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UserError(
            f"not enough free disk space in {root} to write checkpoint step-{step}: needs about "
            f"{gb(needed)}, {gb(free)} free; the last good checkpoint is {last_good(run_dir)}; "
            "free space or set train.keep_checkpoints lower"
        )
    # A checkpoint at this step or later was written by an abandoned future of this run (it
    # resumed from an earlier step): set it aside rather than overwrite it or let it outrank
    # this one in rotation. (`load` with run_dir already did, unless it was not given one.)
    set_aside(run_dir, step, f"this run is writing step {step} anew")


def _tensor_bytes(accelerator: Any) -> int:
    """What save_state will write, from the tensors: the prepared models' parameters and the
    optimizers' state_dict (AdamW: two tensors per parameter; assumed before the first step; an
    8-bit torchao state by the codes and scales it holds, not the float32 values it stands for;
    torchao's CPU offload keeps no `state` of its own, only a state_dict)."""
    total = 0
    for model in getattr(accelerator, "_models", []):
        total += sum(p.numel() * p.element_size() for p in model.parameters())
    for opt in getattr(accelerator, "_optimizers", []):
        stored = state_bytes(opt.state_dict())
        if stored:
            total += stored
        else:
            params = [p for g in opt.param_groups for p in g["params"]]
            total += 2 * sum(p.numel() * p.element_size() for p in params)
    return total


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _write(accelerator: Any, run_dir: Path, step: int, state: dict) -> Path:
    """save_state into step-N.tmp; then, on the main process, trainer_state.json, the manifest
    (last), a size check of every file, and the rename to step-N."""
    final = checkpoints_dir(run_dir) / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    failure = None
    try:
        with _quiet_shared_tensor_warning():
            accelerator.save_state(str(tmp))
    except Exception as e:  # an I/O failure may surface as torch's or safetensors' own error
        failure = _io_failure(e, tmp, accelerator)
    failure = first_failure(accelerator, failure)  # every process has written its part
    if failure is None and accelerator.is_main_process:
        try:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "checkpoint_format": FORMAT, **state}, indent=2))
            _write_manifest(tmp)
            problem = verify(tmp, checksums=False)
            if problem:
                raise OSError(errno.EIO, f"the checkpoint did not verify after writing: {problem}")
            tmp.rename(final)
        except Exception as e:  # an OSError, or the verification's
            failure = _io_failure(e, tmp, accelerator)
    failure = first_failure(accelerator, failure)
    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        code, text = failure
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            advice = f"make {final.parent} writable or choose another hydra.run.dir"
        else:
            advice = "free space or set train.keep_checkpoints lower"
        raise UserError(
            f"could not write checkpoint step-{step} in {final.parent}: {text}; removed the partial "
            f"{tmp.name}; the last good checkpoint is {last_good(run_dir)}; {advice}"
        )
    return final


# An I/O failure inside save_state may arrive as torch's or safetensors' own error type.
IO_HINTS = ("No space left", "Disk quota", "Read-only file system", "Permission denied", "write failed", "IoError")


def _io_failure(e: Exception, tmp: Path, accelerator: Any) -> tuple[int | None, str]:
    """(errno, one line) for an I/O failure while writing; anything else is a bug: re-raised
    after removing the partial checkpoint."""
    if isinstance(e, OSError) or any(h in str(e) for h in IO_HINTS):
        code = e.errno if isinstance(e, OSError) else (errno.ENOSPC if "No space" in str(e) else None)
        return code, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    raise e


def _rotate(run_dir: Path, keep: int, newest: Path) -> None:
    """Delete good checkpoints beyond the newest `keep` (damaged ones are left for a person to
    look at). `newest`, just written and verified, is the last of them and always stays."""
    good = complete_checkpoints(run_dir)
    assert good and good[-1] == newest, (good, newest)  # discard_future removed any later one
    for old in good[:-keep]:
        try:
            shutil.rmtree(old)
        except OSError as e:  # the new checkpoint is safe; a leftover old one is only space
            log.warning("could not remove old checkpoint %s: %s", old, e)
            continue
        log.info("removed old checkpoint %s (train.keep_checkpoints=%d)", old, keep)


class _SharedTensorWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Removed shared tensor" in message and "while saving" in message)


@contextmanager
def _quiet_shared_tensor_warning() -> Iterator[None]:
    """Drop accelerate's "Removed shared tensor {...} while saving" during save_state, and only it.

    safetensors cannot store two names for one tensor, so accelerate keeps one of each tied
    group and warns. With tied input/output embeddings (the tiny model, most small LMs) that
    is expected and harmless: the model is built tied before load_state, so loading the one
    saved name restores both. Every other message of that logger still passes."""
    logger = logging.getLogger("accelerate.utils.other")
    quiet = _SharedTensorWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
