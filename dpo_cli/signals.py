"""Stop requests by signal: SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 (SLURM's warning before
its time limit: `--signal=USR1@120` in scripts/slurm/dpo.sbatch, USR2 under submitit) ask the
run to finish the optimizer step in progress, save a checkpoint and exit with EXIT_INTERRUPTED
(under SLURM the job is then requeued, see dpo_cli.slurm). A second SIGINT exits at once.

The handler only records the request; the training loop asks `agreed` once per step, and all
processes take the answer of an all-reduce, so they stop after the same step and join the same
collectives (the checkpoint's), whichever of them received the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch

log = logging.getLogger(__name__)

SIGNALS = tuple(
    s
    for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None))
    if s is not None
)
EXIT_AT_ONCE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class StopOnSignal:
    """Context manager installing the handlers (main thread only) and restoring the old ones."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def previous(self, signum: int | None) -> Any:
        """The handler `signum` had before this context (submitit's, under submitit), or None."""
        return self._previous.get(signum) if signum is not None else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            sys.stderr.write("\nsecond SIGINT: exiting now, without saving (the last checkpoint stays valid)\n")
            sys.stderr.flush()
            os._exit(EXIT_AT_ONCE)
        first, self.received = self.received is None, signum
        # Recorded before the warning is written: a repeated signal (`scancel --full` sends USR1
        # two or three times at once) can come while it is, and must not write it again from
        # inside that write (a reentrant write to the log file, a "Logging error" traceback).
        if first:
            log.warning(
                "%s received: finishing the current optimizer step, then saving a checkpoint and exiting%s",
                name,
                " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else "",
            )

    def agreed(self, accelerator: Any) -> str | None:
        """The signal's name when any process received one, on every process; else None."""
        if accelerator.num_processes == 1:
            code = self.received or 0
        else:
            flag = torch.tensor([float(self.received or 0)], device=accelerator.device)
            code = int(accelerator.reduce(flag, "max").item())
        return signal.Signals(code).name if code else None
