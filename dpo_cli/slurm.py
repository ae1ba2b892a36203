"""Running as a SLURM job: which job this is (recorded in the run directory and the logger's run),
the torch.distributed variables of a multi-task job, resuming after a requeue, and requeueing
after SLURM's warning signal.

Preemption, as dpo-cli handles it: SLURM sends a warning signal some time before the job's end
(`--signal=USR1@SECONDS` in scripts/slurm/dpo.sbatch; submitit asks for USR2). The run finishes
its optimizer step, saves a checkpoint and exits with code 75; then the job is requeued, by the
handler that held the signal before the run (submitit's, under the Hydra submitit launcher) or
else by `scontrol requeue` from the main process. The requeued job has the same id and run directory, and SLURM_RESTART_COUNT > 0
makes it resume from the latest checkpoint (train.resume=auto). SIGTERM (a preemption with
PreemptMode=REQUEUE, or scancel) saves and exits the same way without requeueing: SLURM
requeues preempted jobs itself, and a cancelled job stays cancelled.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# SLURM's variables worth keeping with the run: name in the record <- variable.
FIELDS = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "restart_count": "SLURM_RESTART_COUNT",
    "job_name": "SLURM_JOB_NAME",
    "partition": "SLURM_JOB_PARTITION",
    "nodes": "SLURM_JOB_NODELIST",
    "num_nodes": "SLURM_JOB_NUM_NODES",
    "submit_dir": "SLURM_SUBMIT_DIR",
}


def job() -> dict[str, str] | None:
    """This SLURM job's identity, or None outside SLURM."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {name: os.environ[var] for name, var in FIELDS.items() if var in os.environ}


def restarts() -> int:
    """How many times SLURM has requeued this job (0 outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def record(run_dir: Path) -> dict[str, str] | None:
    """Append this job's identity to `run_dir/slurm.jsonl` (one line per start: a requeued job
    adds one) and return it; nothing outside SLURM. Main process only."""
    info = job()
    if info is None:
        return None
    line = {**info, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": os.uname().nodename}
    with open(run_dir / "slurm.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    log.info("SLURM job %s (restart %s) on %s", info["job_id"], info.get("restart_count", "0"), info.get("nodes", "?"))
    return info


def export_distributed_env() -> None:
    """In a SLURM job of several tasks started without a launcher (the Hydra submitit
    launcher's tasks_per_node > 1), set the variables torch.distributed reads from SLURM's:
    one process per task, the first node's first task as the main process."""
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:  # this job step's tasks, not the job's
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:  # submitit is what starts such tasks; without it there are none
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


REQUEUE_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2") if hasattr(signal, name))


def _end_wandb_service() -> None:
    """End wandb's service process (when this process started one) before the job is requeued:
    the requeue SIGTERMs every process of the job, and a service killed before this process
    exits makes wandb's exit hook print a ConnectionResetError traceback into the job's log.
    The W&B run is already finished (the sinks are closed); wandb is not imported for this."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    try:
        wandb.teardown()
    except Exception as e:  # W&B failing never stops the requeue
        log.warning("wandb: ending its service process failed: %s", e)


def hand_on(signum: int | None, previous: Any) -> None:
    """After a run stopped by `signum` saved its checkpoint (main process): under SLURM, have
    SIGUSR1 or SIGUSR2 requeue the job. `previous`, the Python handler that held the signal
    before the run (submitit's), gets it now and requeues in its own way (it then exits);
    otherwise `scontrol requeue`."""
    if signum not in REQUEUE_SIGNALS or job() is None:
        return
    _end_wandb_service()
    if callable(previous):
        log.info("passing %s on to the handler that held it before the run (%s)", signal.Signals(signum).name, previous)
        previous(signum, None)
        return
    job_id = os.environ["SLURM_JOB_ID"]
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
    if done.returncode == 0:
        log.info("SLURM job %s requeued: it resumes from the checkpoint when it starts again", job_id)
    else:
        log.error(
            "could not requeue SLURM job %s (scontrol requeue: %s); resubmit it with train.resume=auto and the same "
            "hydra.run.dir",
            job_id,
            (done.stderr or done.stdout).strip(),
        )


def launcher_info(container: dict[str, Any]) -> dict[str, Any]:
    """`container` (the run's config for the logger) with this job's identity under `slurm`."""
    info = job()
    return {**container, "slurm": info} if info else container
