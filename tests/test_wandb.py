"""Metric sinks when things go wrong: W&B without a key or a server, W&B across a resume, and
metrics.jsonl after a crash. The real wandb package runs in offline mode; "no server" is a
closed local port, so nothing here needs (or reaches) the network."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_cli import metrics
from dpo_cli.config import validate
from dpo_cli.metrics import JsonlSink, WandbSink, resolve_wandb_mode, wandb_reachable


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No W&B key, server or proxy from the machine running the tests; wandb's files in tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a W&B key
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def no_server(monkeypatch, closed_port):
    """An API key, and a W&B server URL that refuses connections."""
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")


def sink(run_dir: Path, mode: str = "offline", resume: bool = False, project: str = "dpo-cli-test") -> WandbSink:
    return WandbSink(mode, project, None, None, None, ["test"], {"lr": 0.001}, run_dir, resume=resume)


def test_wandb_reachable_tries_the_base_url(wandb_env, monkeypatch, listening_port, closed_port):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening_port}")
    assert wandb_reachable()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    assert not wandb_reachable()


def test_wandb_reachable_goes_through_the_https_proxy(wandb_env, monkeypatch, listening_port, closed_port):
    """Behind a proxy, the proxy is what has to answer (the default server is api.wandb.ai)."""
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening_port}")
    assert wandb_reachable()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port}")
    assert not wandb_reachable()


def test_online_without_a_server_falls_back_to_offline_within_seconds(wandb_env, monkeypatch, closed_port, caplog):
    no_server(monkeypatch, closed_port)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="dpo_cli.metrics"):
        assert resolve_wandb_mode("online", wandb_env / "run") == "offline"
    assert time.perf_counter() - started < 5
    [warning] = caplog.records
    assert "cannot be reached" in warning.getMessage()
    assert f"wandb sync {wandb_env / 'run' / 'wandb' / 'offline-run-*'}" in warning.getMessage()


def test_online_without_an_api_key_falls_back_to_offline(wandb_env, caplog):
    with caplog.at_level(logging.WARNING, logger="dpo_cli.metrics"):
        assert resolve_wandb_mode("online") == "offline"
    [warning] = caplog.records
    assert "no API key" in warning.getMessage() and "`wandb login`, then `wandb sync" in warning.getMessage()


@pytest.mark.parametrize("mode", ["online", "offline", "disabled"])
def test_a_usable_mode_is_kept_without_a_warning(wandb_env, monkeypatch, listening_port, mode, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening_port}")
    with caplog.at_level(logging.WARNING, logger="dpo_cli.metrics"):
        assert resolve_wandb_mode(mode) == mode
    assert not caplog.records


def test_the_sink_logs_offline_when_the_server_cannot_be_reached(wandb_env, monkeypatch, closed_port):
    no_server(monkeypatch, closed_port)
    run_dir = wandb_env / "run"
    run_dir.mkdir()
    s = sink(run_dir, mode="online")
    s.log({"step": 1, "loss": 0.69})
    s.close()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.integration
def test_a_resumed_run_continues_the_same_wandb_run(wandb_env):
    run_dir = wandb_env / "run"
    run_dir.mkdir()
    first = sink(run_dir)
    first.log({"step": 1, "loss": 0.69})
    first.close()
    second = sink(run_dir, resume=True)
    second.log({"step": 2, "loss": 0.6})
    second.close()
    assert second.run.id == first.run.id
    # Offline runs are stored as offline-run-<date>-<id>[-n]; `wandb sync` joins runs of one id.
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f"-{first.run.id}" in f.name for f in folders)

    again = sink(run_dir)  # a new run in the directory (not a resume) is a new W&B run
    again.close()
    assert again.run.id != first.run.id


def test_a_failing_wandb_init_does_not_stop_training(wandb_env, caplog):
    """wandb.init raises on a project name with a slash; the sink warns and drops its rows."""
    run_dir = wandb_env / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="dpo_cli.metrics"):
        s = sink(run_dir, project="team/project")
        s.log({"step": 1, "loss": 0.69})
        s.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("Invalid project name" in m for m in messages)
    assert "continuing without W&B" in messages[-1]


@pytest.mark.slow
def test_an_online_init_that_times_out_retries_offline(wandb_env, monkeypatch, listening_port, caplog):
    """A server that accepts connections but never answers passes the reachability check;
    wandb.init then times out (INIT_TIMEOUT_S, shortened here) and the sink logs offline."""
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening_port}")
    monkeypatch.setattr(metrics, "INIT_TIMEOUT_S", 2.0)
    run_dir = wandb_env / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="dpo_cli.metrics"):
        s = sink(run_dir, mode="online")
    s.log({"step": 1, "loss": 0.69})
    s.close()
    assert any("starting the online W&B run failed" in r.getMessage() for r in caplog.records)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


def test_jsonl_file_is_created_by_the_first_row(tmp_path):
    """A run that crashes before its first row must not leave a metrics.jsonl behind: its
    directory would then look like it holds a run."""
    path = tmp_path / "metrics.jsonl"
    JsonlSink(path).close(failed=True)
    assert not path.exists()
    s = JsonlSink(path)
    s.log({"step": 1, "loss": 0.69})
    assert path.read_text() == '{"step": 1, "loss": 0.69}\n'  # on disk before close
    s.close()


WRITER = """
import sys
from pathlib import Path
from dpo_cli.metrics import JsonlSink
sink = JsonlSink(Path(sys.argv[1]))
for step in (1, 2, 3):
    sink.log({"step": step, "loss": 0.5})
print("logged", flush=True)
sys.stdin.read()  # wait to be killed
"""


@pytest.mark.integration
def test_a_killed_run_keeps_every_row_it_logged(tmp_path):
    """kill -9 gives no chance to flush buffers or close files: each row must already be out."""
    path = tmp_path / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline() == "logged\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_jsonl_resume_rewrites_the_file_in_place(tmp_path):
    """The kept rows replace the file whole (no temporary file left); later rows append."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    s = JsonlSink(path, resume_step=2)
    assert path.read_text() == '{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n'
    s.log({"step": 3, "loss": 0.5})
    s.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.integration
def test_a_slurm_job_id_reaches_the_run_directory_and_the_wandb_run(wandb_env, monkeypatch, tmp_path):
    """Under SLURM (its variables as sbatch sets them), the job's identity is appended to
    <run dir>/slurm.jsonl and put in the W&B run's config (a real offline W&B run)."""
    from accelerate.state import AcceleratorState
    from conftest import FAST, make_config

    from dpo_cli import train

    for var, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_PARTITION": "gpu", "SLURM_JOB_NODELIST": "node1"}.items():
        monkeypatch.setenv(var, value)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    cfg = make_config([*FAST, "logger.wandb.mode=offline", "logger.progress=false", "train.max_steps=1"])
    AcceleratorState._reset_state(reset_partial_state=True)
    train.run(validate(cfg))
    job = json.loads((run_dir / "slurm.jsonl").read_text())
    assert (job["job_id"], job["partition"], job["nodes"]) == ("4242", "gpu", "node1")
    # An offline run keeps its config in the run's record log (protobuf; the value as JSON).
    # W&B's service writes it on its own: wait for it (up to 30 s; once, a finished run's log
    # held only its header when read at once).
    (record_log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while b"slurm" not in record_log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"slurm" in record_log.read_bytes()
    assert b'{"job_id":"4242","partition":"gpu","nodes":"node1"}' in record_log.read_bytes()
