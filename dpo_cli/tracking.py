"""Metric sinks for experiment trackers: TensorBoard event files and MLflow runs.

Both take the rows metrics.jsonl gets (train and eval rows, already averaged over processes) and
are opened on the main process only. Their packages are an optional extra (`pip install
'dpo-cli[tracking]'`): `problems` names the missing one before any weights load.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dpo_cli.errors import first_line
from dpo_cli.hub import endpoint_reachable
from dpo_cli.metrics import Row
from dpo_cli.schema import LoggerConfig, MlflowConfig

log = logging.getLogger(__name__)

# Where a run directory keeps its MLflow run id, so that a resumed run continues the same MLflow run.
RUN_ID_FILE = "mlflow_run_id"
TENSORBOARD_DIR = "tensorboard"
INSTALL = "pip install 'dpo-cli[tracking]'"
# mlflow's limits (mlflow.utils.validation): a param value's length, params and metrics per call.
MAX_PARAM_LENGTH = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
# What mlflow accepts in a metric or param name; any other character becomes "_".
_NOT_IN_NAME = re.compile(r"[^\w\-. :/]")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


@functools.lru_cache(maxsize=8)
def _reachable(uri: str) -> bool:
    """Cached: the command line's check and the run's both ask, and a sweep's jobs share a server."""
    return endpoint_reachable(uri)


def problems(lg: LoggerConfig, quiet: bool = False) -> list[str]:
    """The tracking sinks' problems, found before data and weights load: a missing package (with
    the pip command), an empty experiment, an http(s) tracking server that cannot be reached.
    MLflow settings given while MLflow is off are a warning (unless `quiet`), not a problem: an
    experiment file may set them and the command line turn MLflow off."""
    p = []
    if lg.tensorboard and not _installed("tensorboard"):
        p.append(f"logger.tensorboard=true needs the tensorboard package: {INSTALL} (or pip install tensorboard)")
    m = lg.mlflow
    if not m.enabled:
        given = [k for k, v in vars(m).items() if k != "enabled" and v != getattr(MlflowConfig(), k)]
        if given and not quiet:
            log.warning("logger.mlflow.%s set while logger.mlflow.enabled=false: nothing goes to MLflow", given[0])
        return p
    if not _installed("mlflow"):
        p.append(
            f"logger.mlflow.enabled=true needs the mlflow-skinny package: {INSTALL} (or pip install mlflow-skinny)"
        )
    if not m.experiment.strip():
        p.append("logger.mlflow.experiment is empty: name an MLflow experiment, e.g. logger.mlflow.experiment=dpo-cli")
    uri = m.tracking_uri or ""
    if urlparse(uri).scheme in ("http", "https") and not _reachable(uri):
        p.append(
            f"logger.mlflow.tracking_uri={uri} cannot be reached (no TCP connection within 5 s): start the MLflow "
            "server, fix the address, or leave logger.mlflow.tracking_uri unset for a file store in the run directory"
        )
    return p


def sinks(lg: LoggerConfig, config: dict[str, Any], run_dir: Path, resume_step: int | None) -> list[Any]:
    """The tracking sinks `lg` turns on, for a run in `run_dir` resumed from `resume_step` (or None)."""
    out: list[Any] = []
    if lg.tensorboard:
        out.append(TensorBoardSink(run_dir / TENSORBOARD_DIR, config, resume_step))
    if lg.mlflow.enabled:
        out.append(MlflowSink(lg.mlflow, config, run_dir, resume=resume_step is not None))
    return out


def numbers(row: Row) -> dict[str, float]:
    """A row's numeric values (its step left out): what the trackers plot."""
    return {
        k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TensorBoardSink:
    """TensorBoard event files in `log_dir`: every numeric value of a row as a scalar at the row's
    step, the config as text. A resumed run writes to the same directory with `purge_step` one past
    the checkpoint's step, so that TensorBoard hides what the killed run logged after it (the
    resumed run logs those steps again). A run started over in a directory whose earlier run saved
    no checkpoint (metrics.jsonl set aside) hides all of that run's events the same way. Each row
    is flushed, as metrics.jsonl's are."""

    def __init__(self, log_dir: Path, config: dict[str, Any], resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        if resume_step is not None:
            purge: int | None = resume_step + 1
        else:
            purge = 0 if any(log_dir.glob("events.out.tfevents.*")) else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        if resume_step is None:  # a resumed run's directory has it already
            import yaml

            text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
            # Indented four spaces: TensorBoard renders text as Markdown, this keeps it a code block.
            self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), global_step=0)

    def log(self, row: Row) -> None:
        for name, value in numbers(row).items():
            self.writer.add_scalar(name, value, global_step=row["step"])
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def mlflow_name(name: str) -> str:
    """`name` as mlflow accepts it: characters other than letters, digits, `_ - . : /` and space
    become `_`, and a leading `/` goes (mlflow refuses names that read as absolute paths)."""
    return _NOT_IN_NAME.sub("_", name).lstrip("/") or "_"


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as flat `a.b.c: value` strings; a value longer than mlflow keeps is cut, and
    the cut said at its end."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_LENGTH:
            note = f"... [truncated: {len(text)} characters]"
            text = text[: MAX_PARAM_LENGTH - len(note)] + note
        out[mlflow_name(f"{prefix}{key}")] = text
    return out


def tracking_uri(setting: str | None, run_dir: Path) -> str:
    """The MLflow tracking URI: `setting`, or a file store in the run directory; a relative file
    store path is resolved against the run directory (not the working directory)."""
    if setting is None:
        return f"file:{(run_dir / 'mlruns').resolve()}"
    url = urlparse(setting)
    if url.scheme not in ("", "file") or (url.scheme == "file" and url.netloc):
        return setting
    path = Path(url.path if url.scheme == "file" else setting).expanduser()
    return f"file:{(run_dir / path).resolve()}"


class MlflowSink:
    """One MLflow run per run directory, through mlflow's client API: rows as metrics at their
    step, the config as params. A resumed run continues the run it started (its id is kept in
    <run dir>/mlflow_run_id) and skips the values MLflow already holds for a step (logged after
    the checkpoint, before the stop; resuming recomputes the same values). As with W&B, an MLflow
    failure never stops training: the sink warns and drops its rows (metrics.jsonl has them)."""

    def __init__(self, settings: MlflowConfig, config: dict[str, Any], run_dir: Path, resume: bool = False):
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(settings.tracking_uri, run_dir)
        if uri.startswith("file:"):
            # mlflow 3.x refuses its file store unless this is set; the other local store (sqlite)
            # needs SQLAlchemy, which mlflow-skinny does not bring (README, Experiment tracking).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client: Any = None
        self.run_id = ""
        self.last_step: dict[str, int] = {}  # on resume: the last step MLflow holds per metric
        try:
            client = MlflowClient(tracking_uri=uri)
            self.run_id = self._open(client, settings, run_dir, resume)
            self._log_params(client, flat_params(config))
            self.client = client
            log.info("mlflow: run %s in experiment %r at %s", self.run_id, settings.experiment, uri)
        except Exception as e:  # whatever mlflow raises, training goes on (metrics.jsonl has every row)
            log.warning(
                "mlflow: starting the MLflow run at %s failed (%s); continuing without MLflow", uri, first_line(e)
            )

    def _open(self, client: Any, settings: MlflowConfig, run_dir: Path, resume: bool) -> str:
        """The stored run, set running again, when resuming; else a new run, its id stored."""
        path = run_dir / RUN_ID_FILE
        stored = path.read_text().strip() if resume and path.is_file() else ""
        if stored:
            try:
                run = client.get_run(stored)
            except Exception as e:  # e.g. another tracking_uri than the first run's
                log.warning(
                    "mlflow: the stored run %s cannot be continued (%s); starting a new one", stored, first_line(e)
                )
            else:
                client.update_run(stored, status="RUNNING")
                self.last_step = {
                    k: max(m.step for m in client.get_metric_history(stored, k)) for k in run.data.metrics
                }
                return stored
        experiment = client.get_experiment_by_name(settings.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(settings.experiment)
            except Exception:  # a sweep's other job created it first
                experiment_id = client.get_experiment_by_name(settings.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        name = settings.run_name or run_dir.name
        run = client.create_run(experiment_id, run_name=name, tags={"dpo_cli.run_dir": str(run_dir.resolve())})
        path.write_text(run.info.run_id + "\n")
        return run.info.run_id

    def _log_params(self, client: Any, params: dict[str, str]) -> None:
        """The params this MLflow run lacks: mlflow refuses to change a param's value, so a resumed
        run keeps the first run's values (its own config is in its .hydra/ directory)."""
        from mlflow.entities import Param

        held = client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in held]
        changed = sorted(k for k, v in params.items() if k in held and held[k] != v)
        if changed:
            log.info("mlflow: params keep the first run's values for %s", ", ".join(changed))
        for i in range(0, len(new), PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=new[i : i + PARAMS_PER_BATCH])

    def log(self, row: Row) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        step, now = row["step"], int(time.time() * 1000)
        names = {mlflow_name(k): v for k, v in numbers(row).items()}
        values = [Metric(k, v, now, step) for k, v in names.items() if step > self.last_step.get(k, -1)]
        try:
            for i in range(0, len(values), METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=values[i : i + METRICS_PER_BATCH])
        except Exception as e:  # e.g. the server went away: stop sending, keep training
            log.warning("mlflow: logging failed (%s); continuing without MLflow", first_line(e))
            self.client = None

    def close(self, failed: bool = False) -> None:
        if self.client is None:
            return
        try:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        except Exception as e:
            log.warning("mlflow: ending the MLflow run failed: %s", first_line(e))
