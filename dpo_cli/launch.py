"""What a launcher (accelerate launch, torchrun, an sbatch script) hands the run, checked before
any weights load. FSDP and DeepSpeed need GPUs. Gradient accumulation belongs to dpo-cli
(train.batch_size = micro batch x accumulation x processes), never to the launcher, so that
every launcher runs the same optimization: a launcher's own value that disagrees is refused,
and DeepSpeed's batch, accumulation and clipping settings are filled in from the config.

`python -m dpo_cli.launch wait-for HOST PORT` is the sbatch template's check that a node can
reach the main process before it starts its launcher (whose own failure is a traceback after
a long timeout).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

from dpo_cli.distributed import cpu_only
from dpo_cli.errors import EXIT_USER_ERROR, UserError
from dpo_cli.schema import TrainConfig

ACCUMULATION_ENV = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
SHARDED_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def _enabled(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def check_environment(accum: int) -> None:
    """Refuse a launch this machine or config cannot run as asked."""
    for var, what in SHARDED_ENV.items():
        if _enabled(var) and cpu_only():
            raise UserError(
                f"accelerate launch asked for {what} ({var}=true, from --use_{what.lower()} or a config file with "
                f"distributed_type: {what.upper()}), which accelerate runs only on GPUs, and this machine has none. "
                "On CPU, launch DDP instead: accelerate launch --config_file scripts/accelerate/ddp.yaml "
                "--num_processes N -m dpo_cli ... (or torchrun --nproc_per_node N -m dpo_cli ...)"
            )
    asked = os.environ.get(ACCUMULATION_ENV, "").strip()
    if asked.isdigit() and int(asked) != accum:
        raise UserError(
            f"the launcher set gradient accumulation to {asked} ({ACCUMULATION_ENV}, from accelerate launch "
            "--gradient_accumulation_steps or a config file's gradient_accumulation_steps), but dpo-cli derives it "
            f"from the config: train.batch_size / (train.micro_batch_size x processes) = {accum}. Remove the "
            "launcher's setting and size the step with train.batch_size and train.micro_batch_size"
        )


def accumulation_plugin(accum: int) -> Any:
    """accelerate's accumulation settings, passed explicitly so that no environment variable
    changes them: `accelerator.backward` divides each micro batch's loss by `accum`, and
    `accelerator.accumulate` holds gradient synchronization until the step's last micro batch."""
    from accelerate.utils import GradientAccumulationPlugin

    return GradientAccumulationPlugin(num_steps=accum, sync_with_dataloader=False)


def configure_deepspeed(accelerator: Any, t: TrainConfig, accum: int) -> None:
    """Fill a DeepSpeed launch's batch, accumulation and clipping settings from the config
    (dpo-cli has no dataloader for accelerate to read them from); refuse values set otherwise."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.batch_size,
        "gradient_clipping": float(t.max_grad_norm) if t.max_grad_norm is not None else 0.0,
    }
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != value:
            raise UserError(
                f"the DeepSpeed config has {key}={have} (set there, by a launcher flag, or filled in by accelerate "
                f"when a DeepSpeed JSON file leaves it out), but this run's config gives {value} (from "
                "train.batch_size, train.micro_batch_size, the number of processes and train.max_grad_norm); set it to "
                '"auto" in the DeepSpeed config (scripts/accelerate/zero*.yaml leave it to dpo-cli) or change the '
                "train settings"
            )
        ds[key] = value
    plugin.gradient_accumulation_steps = accum


def grad_norm_of(value: Any, device: Any) -> Any:
    """The gradient norm clip_grad_norm_ returned, as a tensor, or None where the launcher does
    not report one (DeepSpeed clips inside its engine and may return None)."""
    import torch

    if value is None:
        return None
    if hasattr(value, "full_tensor"):  # FSDP2 returns a DTensor: the whole (replicated) value
        value = value.full_tensor()
    return value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value), device=device)


def wait_for(host: str, port: int, timeout: float, connect: float = 3.0) -> str | None:
    """None once `host:port` accepts a TCP connection within `timeout` seconds, else why not."""
    deadline = time.monotonic() + timeout
    reason = "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=connect):
                return None
        except socket.gaierror as e:
            return f"the name {host!r} does not resolve on {socket.gethostname()} ({e.strerror})"
        except OSError as e:
            reason = e.strerror or str(e)
        if time.monotonic() >= deadline:
            return f"{host}:{port} did not accept a connection from {socket.gethostname()} within {timeout:.0f} s ({reason})"
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpo_cli.launch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait-for", help="wait until HOST:PORT (the main process) accepts connections")
    w.add_argument("host")
    w.add_argument("port", type=int)
    w.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    args = parser.parse_args(argv)
    problem = wait_for(args.host, args.port, args.timeout)
    if problem:
        sys.stderr.write(
            f"error: this node cannot reach the main process: {problem}. Check that --main_process_ip names the "
            "first node by an address the other nodes can reach (the sbatch template uses the first host of "
            "SLURM_JOB_NODELIST), that the port is open between nodes (set MAIN_PROCESS_PORT to another free "
            "port), and that the first node started\n"
        )
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
