"""The TensorBoard and MLflow sinks (dpo_cli/tracking.py), read back with each tool's own reader:
TensorBoard's EventAccumulator and MLflow's client. MLflow writes to a file store in a temporary
directory, and "no server" is a closed local port: nothing here reaches the network."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from conftest import make_config, read_metrics, train_once

from dpo_cli.config import validate
from dpo_cli.errors import ConfigError
from dpo_cli.schema import LoggerConfig, MlflowConfig
from dpo_cli.tracking import (
    INSTALL,
    MAX_PARAM_LENGTH,
    RUN_ID_FILE,
    MlflowSink,
    TensorBoardSink,
    flat_params,
    mlflow_name,
    problems,
    tracking_uri,
)

CONFIG = {"train": {"lr": 0.001, "tags": ["a", "b"], "resume": None}, "loss": {"_target_": "x.DPO", "beta": 0.1}}


def rows(steps, scale: float = 1.0) -> list[dict]:
    return [{"step": s, "loss": scale / s, "rewards/accuracies": 0.5, "note": "text", "flag": True} for s in steps]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) pairs, as TensorBoard shows them (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture
def file_store(monkeypatch):
    """MLFLOW_ALLOW_FILE_STORE unset, as on a user's machine (the sink sets it), and restored after."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(None, run_dir))
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    return client, client.get_run(run_id)


def history(client, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def test_tensorboard_holds_each_rows_numbers_at_its_step_and_the_config(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb", CONFIG)
    for row in rows([1, 2, 3]):
        sink.log(row)
    sink.close()
    got = scalars(tmp_path / "tb")
    assert sorted(got) == ["loss", "rewards/accuracies"]  # strings and booleans are not plotted
    assert got["loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    [text] = events.Tensors("config/text_summary")
    assert b"beta: 0.1" in text.tensor_proto.string_val[0]


def test_a_resumed_tensorboard_run_replaces_the_steps_after_the_checkpoint(tmp_path):
    """Killed after logging step 4, resumed from the checkpoint at step 2: steps 3 and 4 are
    logged again, and TensorBoard shows them once, with the resumed run's values."""
    first = TensorBoardSink(tmp_path / "tb", CONFIG)
    for row in rows([1, 2, 3, 4]):
        first.log(row)
    first.close()
    second = TensorBoardSink(tmp_path / "tb", CONFIG, resume_step=2)
    for row in rows([3, 4, 5], scale=10.0):
        second.log(row)
    second.close()
    assert scalars(tmp_path / "tb")["loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(10 / 3)), (4, 2.5), (5, 2.0)]

    again = TensorBoardSink(tmp_path / "tb", CONFIG)  # started over (no checkpoint): the earlier events are hidden
    again.log(rows([1])[0])
    again.close()
    assert scalars(tmp_path / "tb") == {"loss": [(1, 1.0)], "rewards/accuracies": [(1, 0.5)]}


def test_mlflow_holds_the_rows_the_params_and_the_runs_end(tmp_path, file_store):
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    sink = MlflowSink(MlflowConfig(enabled=True), CONFIG, run_dir)
    for row in rows([1, 2, 3]):
        sink.log(row | {"eval_win_rate@0.95": 0.75})
    sink.close()
    client, run = mlflow_run(run_dir)
    assert (run.info.run_name, run.info.status) == ("my-run", "FINISHED")
    assert client.get_experiment(run.info.experiment_id).name == "dpo-cli"
    assert history(client, run.info.run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert sorted(run.data.metrics) == ["eval_win_rate_0.95", "loss", "rewards/accuracies"]
    assert run.data.params == {
        "train.lr": "0.001",
        "train.tags": '["a", "b"]',
        "train.resume": "null",
        "loss._target_": "x.DPO",
        "loss.beta": "0.1",
    }
    assert (run_dir / "mlruns").is_dir()  # the default store: inside the run directory


def test_a_resumed_mlflow_run_continues_the_same_run_without_repeating_steps(tmp_path, file_store):
    """Steps 3 and 4 were logged before the stop; the resumed run (from step 2) logs them again,
    and MLflow, which cannot delete a value, keeps one value per step."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = MlflowSink(MlflowConfig(enabled=True), CONFIG, run_dir)
    for row in rows([1, 2, 3, 4]):
        first.log(row)
    first.close(failed=True)
    second = MlflowSink(MlflowConfig(enabled=True), {**CONFIG, "extra": 1}, run_dir, resume=True)
    for row in rows([3, 4, 5]):
        second.log(row)
    second.close()
    assert second.run_id == first.run_id
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED"
    assert history(client, run.info.run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25), (5, 0.2)]
    assert run.data.params["extra"] == "1"  # a param the first run lacked is added

    again = MlflowSink(MlflowConfig(enabled=True), CONFIG, run_dir)  # a new run in the directory, not a resume
    again.close()
    assert again.run_id != first.run_id


def test_names_and_long_params_are_made_acceptable_to_mlflow():
    assert mlflow_name("rewards/chosen") == "rewards/chosen"
    assert mlflow_name("eval_win_rate@0.95") == "eval_win_rate_0.95"
    assert mlflow_name("/loss(sft)") == "loss_sft_"
    [value] = flat_params({"data": {"path": "x" * 7000}}).values()
    assert len(value) == MAX_PARAM_LENGTH and value.endswith("... [truncated: 7000 characters]")


def test_the_tracking_uri_is_resolved_against_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    assert tracking_uri(None, run_dir) == f"file:{run_dir}/mlruns"
    assert tracking_uri("store", run_dir) == f"file:{run_dir}/store"
    assert tracking_uri("file:../shared", run_dir) == f"file:{tmp_path}/shared"
    assert tracking_uri("file:///abs/store", run_dir) == "file:/abs/store"
    assert tracking_uri("https://mlflow.example.com", run_dir) == "https://mlflow.example.com"


def test_an_unreachable_tracking_server_is_refused_before_anything_loads():
    with socket.socket() as s:  # a local port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_config(["logger.mlflow.enabled=true", f"logger.mlflow.tracking_uri=http://127.0.0.1:{port}"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert f"logger.mlflow.tracking_uri=http://127.0.0.1:{port} cannot be reached" in str(e.value)


def test_a_missing_package_is_named_with_its_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` finds when it is not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    found = problems(LoggerConfig(tensorboard=True, mlflow=MlflowConfig(enabled=True)))
    assert len(found) == 2 and all(INSTALL in p for p in found)
    assert problems(LoggerConfig()) == []  # off by default: nothing is needed


def test_mlflow_settings_while_mlflow_is_off_are_a_warning(caplog):
    off = LoggerConfig(mlflow=MlflowConfig(tracking_uri="http://127.0.0.1:1"))
    assert problems(off) == [] and "logger.mlflow.tracking_uri set while logger.mlflow.enabled=false" in caplog.text


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One short run with both trackers on, an evaluation at steps 2 and 4."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # unset, as on a user's machine (the sink sets it)
        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
        overrides = ["train.max_steps=4", "train.eval_every=2", "logger.tensorboard=true", "logger.mlflow.enabled=true"]
        _, run_dir = train_once(tmp_path_factory.mktemp("tracked") / "run", overrides)
        yield run_dir


@pytest.mark.integration
def test_the_trackers_hold_the_rows_of_metrics_jsonl(tracked_run):
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(tracked_run):
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(name, []).append((row["step"], float(value)))
    assert "eval_loss" in expected and len(expected["loss"]) == 4
    got = scalars(tracked_run / "tensorboard")
    assert got == {k: [(s, pytest.approx(v)) for s, v in pairs] for k, pairs in expected.items()}
    client, run = mlflow_run(tracked_run)
    assert run.info.status == "FINISHED" and set(run.data.metrics) == {mlflow_name(k) for k in expected}
    for name, pairs in expected.items():
        assert history(client, run.info.run_id, mlflow_name(name)) == sorted(pairs)
    assert json.loads(run.data.params["train.max_steps"]) == 4
