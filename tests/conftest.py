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

# No W&B, no progress bar, no report drawing (most of a short run's time) and no generation
# evaluation (data=synthetic chooses judge=sort). A test of reports or generation asks for them
# after these (logger.report=true, judge=sort): a later override wins.
QUIET = ["logger.wandb.mode=disabled", "logger.progress=false", "logger.report=false", "judge=none"]
# Small and quick: conf/debug/default.yaml (8 pairs per step, 256 training and 32 held-out pairs,
# no warm start, and QUIET's settings). Plain DPO (the built-in task's default is RPO, DPO + NLL):
# a test's own loss=... comes later and wins.
FAST = ["debug=default", "loss=dpo"]


# The test now running (set before its fixtures), for `_integration_only`.
_RUNNING: dict[str, pytest.Item] = {}


# The files that take longest (test_slurm's jobs when a cluster runs; then by the seconds of their
# tests among the 80 slowest of a `make test` on 2 cores: scale 217, gpu_check 195, evalmode 174,
# cli 157, interrupt 135, e2e 115, cli_errors 97, harness 82, model_loading 37, reference 32,
# preflight 31): run first, so that on several workers (make test: pytest-xdist, one file per
# worker at a time) the short files fill in at the end instead of one worker finishing them alone.
# test_gpu_check before test_scale: its one long test (scripts/gpu/check.sh's CPU dry run, 188 s)
# is the longest of the suite.
SLOW_FILES = (
    "test_slurm",
    "test_gpu_check",
    "test_scale",
    "test_evalmode",
    "test_cli",
    "test_interrupt",
    "test_e2e",
    "test_cli_errors",
    "test_harness",
    "test_model_loading",
    "test_reference",
    "test_preflight",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu/check.sh runs the gpu tests on one)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(no_gpu)

    def rank(item: pytest.Item) -> int:
        stem = item.path.stem
        return SLOW_FILES.index(stem) if stem in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _RUNNING["item"] = item


def _integration_only(what: str) -> None:
    """A test that trains a whole run or starts a process carries the `integration` mark, which
    `make test-fast` leaves out; one that does not fails here, naming the mark."""
    item = _RUNNING.get("item")
    if item is not None and item.get_closest_marker("integration") is None:
        pytest.fail(
            f"{item.nodeid} {what}: mark it @pytest.mark.integration (make test-fast leaves those out)", pytrace=False
        )


def make_config(overrides: list[str]):
    """The composed config for these command-line overrides (what `dpo-train ARGS` would run)."""
    cli.register()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=cli.old_spellings(["dpo-train", *overrides])[1:])


def _train(overrides: list[str], run_dir: Path, fast: bool, monkeypatch: pytest.MonkeyPatch):
    from accelerate.state import AcceleratorState

    from dpo_cli import config, train

    run_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(run_dir)  # outside Hydra's launcher, the run dir is the working directory
    cfg = make_config(QUIET + (FAST if fast else []) + overrides)
    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per run, as in a fresh process
    result = train.run(config.validate(cfg))  # what the entry point passes down: the typed config
    _integration_only("trained a whole run")  # a run refused before training is quick: any test may
    return result, run_dir


@pytest.fixture
def train_run(tmp_path, monkeypatch):
    """Call `train.run` on composed overrides (after QUIET and, unless fast=False, FAST) inside a
    run directory; returns (result, run_dir)."""

    def _run(overrides: list[str], run_dir: Path | None = None, fast: bool = True):
        return _train(overrides, run_dir or tmp_path / "run", fast, monkeypatch)

    return _run


def train_once(run_dir: Path, overrides: list[str], fast: bool = True):
    """`train_run` for a module-scoped fixture: one run whose outputs many tests read (none may
    change them); the working directory is restored afterwards. Returns (result, run_dir)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _train(overrides, run_dir, fast, monkeypatch)


def data_config(**values):
    """A typed data section (`DataConfig`, every key at its default but the tokenization cache,
    off unless `cache_dir` is given) with `values`; `format` may be a format's name, and
    `columns` its column map."""
    from dpo_cli.data.formats import format_class
    from dpo_cli.data.options import DataConfig

    values = {"cache_dir": None, **values}
    columns = values.pop("columns", None)
    if isinstance(values.get("format"), str):
        cls = format_class(values["format"])
        values["format"] = cls(columns=columns) if columns else cls()
    return DataConfig(**values)


def yaml_leaves(node, prefix: str = ""):
    """(dotted key, value) for every leaf of a plain container read from a YAML file, its
    defaults list left out."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "defaults":
                yield from yaml_leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Metrics that are timings: they differ between two runs of the same computation.
THROUGHPUT = {"tokens_per_s", "pairs_per_s"}


def resumed_like_uninterrupted(full_dir: Path, step: int, resumed_dir: Path, overrides: list[str]) -> None:
    """Resume a copy of `full_dir`'s checkpoint after `step` in `resumed_dir` (`train_once`,
    `overrides` plus train.resume=auto) and check it against the uninterrupted run: the same
    rows, timings aside, and bit-equal final weights."""
    import shutil

    import torch
    from safetensors.torch import load_file

    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_dir / "checkpoints" / f"step-{step}", resumed_dir / "checkpoints" / f"step-{step}")
    shutil.copy(full_dir / "metrics.jsonl", resumed_dir / "metrics.jsonl")  # the resume drops rows after `step`
    train_once(resumed_dir, [*overrides, "train.resume=auto"])

    def exact(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k not in THROUGHPUT} for row in rows]

    assert exact(read_metrics(resumed_dir)) == exact(read_metrics(full_dir))
    a, b = (load_file(d / "final" / "model.safetensors") for d in (full_dir, resumed_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command from the venv's bin/ (dpo-train, accelerate, torchrun) as a user would."""
    _integration_only(f"started a process ({args[0]})")
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
    exe = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
    return subprocess.run([exe, *args[1:]], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher's main process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    return free_port()


@pytest.fixture
def listening_port():
    """A local port that accepts TCP connections (and never answers them)."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]
