"""Shared fixtures: compose configs the way `dpo-train` does, and run training in a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dpo_cli import cli

REPO = Path(__file__).resolve().parents[1]
# Tests (and the CLI runs they start) cache tokenized data in a directory of their own, never in
# the user's ~/.cache: a stale cache there could hide a tokenization change.
os.environ["DPO_CLI_CACHE_DIR"] = tempfile.mkdtemp(prefix="dpo-cli-test-cache-")
os.environ["DPO_CLI_REFERENCE_CACHE_DIR"] = tempfile.mkdtemp(prefix="dpo-cli-test-refcache-")
BIN = Path(sys.executable).parent

QUIET = ["logger.wandb.mode=disabled", "logger.progress=false"]
# Small and quick: 8 pairs per step, evaluation on 32 held-out pairs, no warm start. Plain DPO
# (the built-in task's default is RPO, DPO + NLL): a test's own loss=... comes later and wins.
FAST = [
    "loss=dpo",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "data.synthetic.num_train=256",
    "data.synthetic.num_eval=32",
    "model.warm_start.steps=0",
]


def make_config(overrides: list[str]):
    """The composed config for these command-line overrides (what `dpo-train ARGS` would run)."""
    cli.register()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def train_run(tmp_path, monkeypatch):
    """Call `train.run` on composed overrides inside a run directory; returns (result, run_dir)."""
    from accelerate.state import AcceleratorState

    def _run(overrides: list[str], run_dir: Path | None = None, fast: bool = True):
        run_dir = run_dir or tmp_path / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(run_dir)  # outside Hydra's launcher, the run dir is the working directory
        cfg = make_config(QUIET + (FAST if fast else []) + overrides)
        from dpo_cli import train

        AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per run, as in a fresh process
        return train.run(cfg), run_dir

    return _run


def data_config(**values):
    """A data config section as the schema builds it (every key at its default), with `values`."""
    from omegaconf import OmegaConf

    from dpo_cli.config import ColumnsConfig, DataConfig

    if isinstance(values.get("columns"), dict):
        values = {**values, "columns": ColumnsConfig(**values["columns"])}
    return OmegaConf.structured(DataConfig(**values))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command from the venv's bin/ (dpo-train, accelerate, torchrun) as a user would."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
    exe = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
    return subprocess.run([exe, *args[1:]], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher's main process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
