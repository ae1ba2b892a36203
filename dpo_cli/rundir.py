"""The run directory: held by one run at a time; known as a run's by what a run writes; and left
as it was by a start that fails before training.

Two runs writing one directory (a resume started twice, a copied `hydra.run.dir`) would
interleave their checkpoints and metrics rows, and `train.resume=auto` would then pick up a
mix of both. `hold` takes an exclusive `flock` on `<run dir>/.lock` for the length of a run.
A lock, not a pid file: the operating system releases it when its holder exits, however it
exits (kill -9 and out-of-memory kills included), so a dead run never blocks the next one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpo_cli.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# Filesystems without flock support (some network mounts): the run goes on, unguarded.
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _holder(path: Path) -> str:
    """Who holds the lock at `path`, from what the holder wrote into it."""
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not written its pid yet"  # it took the lock a moment ago


def _take(run_dir: Path) -> tuple[int | None, str | None]:
    """(the locked file descriptor, None), or (None, why not) when another run holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    # Opened without truncating: the file holds the current holder's pid until we have the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, (
            f"{run_dir} is in use by another dpo-train run ({_holder(path)}); "
            "wait for it or choose another hydra.run.dir"
        )
    except OSError as e:
        os.close(fd)
        if e.errno not in NO_LOCKS:
            raise
        log.warning("%s: the filesystem does not support locks; not guarding against a second run", run_dir)
        return None, None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n")
    return fd, None


@contextmanager
def hold(run_dir: Path | str, accelerator: Any = None) -> Iterator[None]:
    """Hold `run_dir` for this run while the block runs; raise UserError if another run holds it.

    Under a multi-process launch pass the Accelerator: the main process takes the lock and
    tells the others whether it got it, so that every process stops together rather than the
    others waiting at their first collective for a main process that has left. Without an
    accelerator this process takes the lock.

    The lock file stays in place after the run (deleting it would let a run that opened it
    just before lock a file no longer in the directory, beside a second run locking a new one).
    """
    run_dir = Path(run_dir)
    main = accelerator is None or accelerator.is_main_process
    fd, problem = _take(run_dir) if main else (None, None)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem], from_process=0)[0]
    if problem is not None:
        raise UserError(problem)
    try:
        yield
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # no stale pid for the next reader
            os.close(fd)  # releases the lock


# What dpo-cli (and Hydra for it) writes into a run directory: a directory holding any of these
# is a run's. One holding only other things (a data folder given as hydra.run.dir) is not.
RUN_MARKERS = (".hydra", "metrics.jsonl", "checkpoints", "final", "warm_start", "eval.json", LOCK_NAME)
HYDRA_FILES = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})  # what Hydra writes into .hydra/


def never_trained(run_dir: Path) -> bool:
    """Whether `run_dir`'s earlier start (if any) left no trace of training, no evaluation and
    no run holds it now: a failed start, whose recorded config a new start may replace."""
    if any((run_dir / name).exists() for name in ("metrics.jsonl", "checkpoints", "final", "eval.json")):
        return False
    fd, problem = None, None
    if (run_dir / LOCK_NAME).exists():
        try:
            fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at close: only a test
        except OSError as e:
            problem = e
        finally:
            if fd is not None:
                os.close(fd)
    return problem is None


def holds_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_MARKERS)


def not_a_run(path: Path) -> bool:
    """Whether `path` is a directory of something else: neither empty nor a run's."""
    return path.is_dir() and any(path.iterdir()) and not holds_run(path)


def check_resumable(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """train.resume=auto continues the run in `run_dir`, or starts one in a new or empty
    directory; a directory of other files (the data folder, by mistake) is refused before
    anything is written into it."""
    if not_a_run(run_dir):
        raise UserError(
            f"train.resume=auto: {run_dir} is not a dpo-train run directory (it holds other files and none of "
            f"{', '.join(RUN_MARKERS[:3])}); pass the directory of the run to continue as {key}=DIR, or a new "
            "or empty one to start afresh"
        )


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested dict (from a config, unresolved) by its dotted key."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    found: dict[str, Any] = {}
    for key, value in node.items():
        found.update(_leaves(value, f"{prefix}{key}."))
    return found


def config_changes(job_dir: Path, config: dict[str, Any]) -> list[str]:
    """`key: old there, new here` for each value of the config `job_dir` recorded first
    (.hydra/config.yaml) that `config` sets otherwise (train.resume aside; keys a later version
    added are not in the record and do not count). Empty when nothing was recorded."""
    recorded = job_dir / ".hydra" / "config.yaml"
    if not recorded.is_file():
        return []
    old = _leaves(OmegaConf.to_container(OmegaConf.load(recorded), resolve=False))
    new = _leaves(config)
    return [
        f"{k}: {old[k]} there, {new.get(k, '<unset>')} here"
        for k in old
        if k != "train.resume" and new.get(k, "<unset>") != old[k]
    ]


def sweep_problem(sweep_dir: Path, jobs: list[tuple[str, Path, dict[str, Any]]]) -> str | None:
    """Why a sweep may not run into `sweep_dir`, whose jobs are (swept values, directory,
    config): a job directory that holds a run is continued only by train.resume=auto with the
    config it ran with, so that a finished job's record (.hydra/, metrics, checkpoints) never
    changes under it; with train.resume=auto no job directory may hold other files."""
    used = [(n, label, d, cfg) for n, (label, d, cfg) in enumerate(jobs) if holds_run(d)]
    fresh = [
        (n, label, d) for n, (label, d, cfg) in enumerate(jobs) if cfg["train"]["resume"] == "auto" and not_a_run(d)
    ]
    if fresh:
        lines = [f"job {n} ({label}): {d} holds other files, not a run" for n, label, d in fresh]
        return (
            "train.resume=auto: job directories that are not dpo-train runs:\n"
            + "\n".join(f"  - {line}" for line in lines)
            + "\nchoose another hydra.sweep.dir"
        )
    blind = [d for _, _, d, cfg in used if cfg["train"]["resume"] != "auto"]
    if blind:
        return (
            f"the sweep directory {sweep_dir} already holds runs in its job directories "
            f"{', '.join(map(str, blind))}; a job's recorded config never changes once it has run: choose "
            "another hydra.sweep.dir, or add train.resume=auto to continue this same sweep (each job with the "
            "config it ran with)"
        )
    changed = [(n, label, d, config_changes(d, cfg)) for n, label, d, cfg in used]
    lines = [f"job {n} ({label}): {d} ran with another config ({'; '.join(c[:3])})" for n, label, d, c in changed if c]
    if lines:
        return (
            "train.resume=auto continues a sweep's jobs only with the config each ran with:\n"
            + "\n".join(f"  - {line}" for line in lines)
            + "\nrepeat the sweep's values, or choose another hydra.sweep.dir for new ones"
        )
    return None


@dataclass(frozen=True)
class Before:
    """A run (or sweep job) directory as it was before Hydra started, so that a start that fails
    before training can take back what it wrote there, and nothing else."""

    path: Path  # absolute
    entries: dict[str, int] | None  # name -> modification time (ns) of each entry; None: it did not exist
    hydra: frozenset[str]  # what its .hydra/ held
    created_from: Path  # the outermost directory that did not exist (path itself when it existed)


def before(run_dir: Path | str) -> Before:
    path = Path(os.path.abspath(run_dir))
    outermost = path
    while not outermost.parent.exists() and outermost.parent != outermost:
        outermost = outermost.parent
    if not path.is_dir():
        return Before(path, None, frozenset(), outermost)
    entries = {e.name: e.lstat().st_mtime_ns for e in path.iterdir()}
    hydra = frozenset(e.name for e in (path / ".hydra").iterdir()) if (path / ".hydra").is_dir() else frozenset()
    return Before(path, entries, hydra, path)


def _only_hydra_files(path: Path) -> bool:
    return path.is_dir() and {e.name for e in path.iterdir()} <= HYDRA_FILES


def _written_at_start(b: Before, log_name: str) -> list[Path] | None:
    """What this start added to b.path, when that is all Hydra's config, its log and the lock
    (None when anything else was added or changed: the run had started)."""
    now = {e.name: e for e in b.path.iterdir()}
    old = b.entries or {}
    ours = {".hydra", log_name, LOCK_NAME}
    if set(now) - set(old) - ours:
        return None
    if any(now[n].lstat().st_mtime_ns != t for n, t in old.items() if n in now and n not in ours):
        return None
    added = [b.path / n for n in set(now) - set(old)]
    hydra = b.path / ".hydra"
    if ".hydra" in old and hydra.is_dir():  # a resume: its own .hydra/resume-N
        added += [hydra / n for n in {e.name for e in hydra.iterdir()} - b.hydra]
    configs = [p for p in added if p.name == ".hydra" or p.parent == hydra]
    return added if all(_only_hydra_files(p) for p in configs) else None


def undo_start(b: Before, log_name: str) -> bool:
    """Remove what a start that failed before training wrote: Hydra's config (.hydra/, or a
    resume's .hydra/resume-N), its log and the lock, then the directories made on the way
    (a sweep's multirun.yaml with them). Nothing is removed when anything else in the directory
    was added or changed since `b`, or when another run holds its lock. Returns whether the
    directory itself went."""
    if not b.path.is_dir():
        return False
    added = _written_at_start(b, log_name)
    if added is None:
        return False
    lock = b.path / LOCK_NAME
    fd = os.open(lock, os.O_RDWR) if lock.exists() else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: another run holds it
        for path in added:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)
    if b.entries is not None:
        return False
    for path in (b.path, *b.path.parents):  # up to the outermost directory this start made
        leftovers = {e.name for e in path.iterdir()}
        if leftovers == {"multirun.yaml"} and path != b.path:  # the sweep's record of a sweep with no job left
            (path / "multirun.yaml").unlink()
        elif leftovers:
            break
        path.rmdir()
        if path == b.created_from:
            break
    return not b.path.exists()
