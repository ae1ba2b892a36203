"""Process-group helpers shared by the CLI (before Hydra starts) and the training loop, and
the ways processes agree: on one process's answer (`broadcast_from_main`, `on_main`) and on
the first failure any of them met (`first_failure`).

accelerate is imported inside the functions that need it: the CLI imports this module before
Hydra starts, and importing accelerate there would slow every command.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import torch

from dpo_cli.errors import UserError

T = TypeVar("T")


def world_size_from_env() -> int:
    """Processes in this launch, as torchrun / accelerate launch announce it (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_only() -> bool:
    """True when no accelerator is present. accelerate then needs `cpu=True` to run a
    multi-process launch as gloo CPU processes; without it each process trains alone."""
    accel = getattr(torch, "accelerator", None)
    if accel is not None:
        return not accel.is_available()
    return not torch.cuda.is_available()


def broadcast_from_main(value: Any) -> Any:
    """`value` as the main process has it, on every process (joins the process group)."""
    if world_size_from_env() <= 1:
        return value
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState(cpu=cpu_only())  # the Accelerator built later in train.run reuses this state
    return broadcast_object_list([value], from_process=0)[0]


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` computed once, on the main process, and its result (or UserError) on every process:
    for decisions all of them must share (which checkpoint to resume from) and actions only one
    may take (renaming or deleting files)."""
    if world_size_from_env() <= 1:
        return fn()
    from accelerate import PartialState

    outcome: tuple[bool, Any] | None = None
    if PartialState(cpu=cpu_only()).is_main_process:
        try:
            outcome = (True, fn())
        except UserError as e:
            broadcast_from_main((False, str(e)))
            raise
    ok, value = broadcast_from_main(outcome)
    if not ok:
        raise UserError(value)
    return value


def first_failure(accelerator: Any, failure: Any) -> Any:
    """The first failure any process met (None if none), on every process; also a barrier. All
    processes then raise together instead of leaving the others waiting in a collective."""
    if accelerator.num_processes == 1:
        return failure
    from accelerate.utils import gather_object

    failures = [f for f in gather_object([failure]) if f is not None]
    return failures[0] if failures else None


def sharded(accelerator: Any) -> bool:
    """Whether the weights are split across processes (FSDP, DeepSpeed ZeRO-3): every forward is
    then a collective, and all processes must run the same number of them."""
    from accelerate import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def in_lockstep(batches: list[list[int]], accelerator: Any, fill: list[int]) -> list[tuple[list[int], int]]:
    """`(indices, weight)` for this process's `batches`, padded with weight-0 batches `fill` up
    to the largest count any process holds when the weights are sharded, so that no process
    leaves the others waiting in a forward's collectives. Unsharded, the batches as they are."""
    if not sharded(accelerator):
        return [(idx, 1) for idx in batches]
    count = torch.tensor([float(len(batches))], device=accelerator.device)
    most = int(accelerator.reduce(count, "max").item())
    return [(idx, 1) for idx in batches] + [(fill, 0)] * (most - len(batches))


def exit_code_of(code: object) -> int:
    """The status `sys.exit(code)` gives the process: None is 0, an int itself, anything else
    (a message) is printed to stderr and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def leave_launched(code: int) -> NoReturn:
    """End a process of a multi-process launch once its work is done and its process group torn
    down: run the exit handlers (logging's flush and close, W&B's, ...) as a normal exit would,
    then leave without the interpreter's finalization and C++ static destructors.

    Why: torch's DistributedDataParallel keeps the gloo process group alive after
    `destroy_process_group` (its worker threads `pt_gloo_runloop` and `gloo_tcp_loop` still run:
    tests/test_exit.py shows it), and tearing that group down during interpreter finalization
    aborts the process now and then ("terminate called without an active exception", exit -6
    after a finished run, seen in about 1 of 8 suite runs). multiprocessing's child processes
    leave the same way (exit handlers, then `os._exit`)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken pipe: nothing left to say on it
    os._exit(code)
