"""The run directory is held by one run at a time.

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
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
