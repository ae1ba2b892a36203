"""Metric sinks: metrics.jsonl, a console progress bar, and Weights & Biases.

Only the main process opens sinks; rows arrive already averaged over processes.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from dpo_cli.errors import first_line
from dpo_cli.hub import endpoint_reachable

log = logging.getLogger(__name__)

Row = dict[str, Any]


def _step_of(line: str, default: int) -> int:
    """The step of a metrics.jsonl line; `default` for a line a crash cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return default


class JsonlSink:
    """One JSON object per line: {"step": N, ...metrics}.

    The file is created with the first row, so that a run that crashed before logging anything
    leaves no metrics.jsonl behind to mark its directory as holding a run. Each row is flushed
    to the operating system as it is written, so a killed process (kill -9, out of memory)
    loses at most the row it was writing; resuming drops that cut line. Rows are not fsync'ed:
    that would cost a disk round trip per row (much more on network file systems) and guards
    only against the machine itself going down, which checkpoints are not synced against either.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.file: IO[str] | None = None
        if resume_step is not None and path.exists():
            # Rows logged after the checkpoint we resume from will be logged again, and a crash
            # may have cut the last line short: drop both, so that the file reads like one
            # uninterrupted run. The rest is rewritten under a temporary name and renamed over
            # the file, so that a crash while rewriting cannot lose the rows kept.
            kept = [
                line for line in path.read_text().splitlines() if _step_of(line, default=resume_step + 1) <= resume_step
            ]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def log(self, row: Row) -> None:
        if self.file is None:
            self.file = self.path.open("a")
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self, failed: bool = False) -> None:
        if self.file is not None:
            self.file.close()


class ProgressSink:
    """A tqdm bar over optimizer steps with loss, accuracy and ETA; eval rows go to the log."""

    def __init__(self, total: int, initial: int):
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        # Console log lines (eval results, checkpoints) are printed above the bar, not through it.
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()

    def log(self, row: Row) -> None:
        """Advance to the row's step; show what a training row has. An eval row (held-out or
        generation metrics only) or a window whose steps were all skipped as non-finite (no
        loss) moves the bar and shows the non-finite count instead of failing on a missing key."""
        self.bar.update(max(0, row["step"] - self.bar.n))
        if any(k.startswith("eval_") for k in row):
            return
        shown = {}
        if "loss" in row:
            shown["loss"] = f"{row['loss']:.4f}"
        accuracy = row.get("rewards/accuracies", row.get("accuracy"))  # a reward model's: accuracy
        if accuracy is not None:  # pairs only: unpaired data has no accuracy
            shown["acc"] = f"{accuracy:.3f}"
        if row.get("nonfinite_steps"):
            shown["skipped"] = str(row["nonfinite_steps"])
        self.bar.set_postfix(shown, refresh=False)

    def close(self, failed: bool = False) -> None:
        self._redirect.__exit__(None, None, None)
        self.bar.close()


def wandb_base_url() -> str:
    """The W&B server: WANDB_BASE_URL, or the public one."""
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def wandb_credentials() -> bool:
    """Whether an API key is configured (env var or netrc), so online mode will not prompt."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(wandb_base_url()).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_reachable(timeout: float = 5.0) -> bool:
    """Whether the W&B server (WANDB_BASE_URL) answers a TCP connection within `timeout` s,
    through the HTTPS proxy that serves it, if any."""
    return endpoint_reachable(wandb_base_url(), timeout)


def resolve_wandb_mode(mode: str, run_dir: Path | None = None) -> str:
    """The W&B mode a run will use: `online` becomes `offline`, with one warning, when no API
    key is configured (wandb would prompt for one) or the W&B server cannot be reached (wandb
    would retry for about 100 s, then fail). Other modes are returned as they are.

    Called once before data and weights load, so that the answer comes within seconds of the
    start instead of after the model has loaded; calling it again on its answer changes nothing.
    """
    if mode != "online":
        return mode
    if not wandb_credentials():
        why, then = "no API key configured (WANDB_API_KEY or `wandb login`)", "`wandb login`, then "
    elif not wandb_reachable():
        why, then = f"{wandb_base_url()} cannot be reached", ""
    else:
        return mode
    where = (run_dir / "wandb") if run_dir is not None else Path("<run dir>", "wandb")
    log.warning(
        "wandb: %s; logging offline to %s. To upload the run later: %s`wandb sync %s`",
        why,
        where,
        then,
        where / "offline-run-*",
    )
    return "offline"


# wandb.init gives up after this many seconds instead of its default 90: a run that cannot reach
# W&B carries on without it (metrics.jsonl has every row) rather than waiting on it.
INIT_TIMEOUT_S = 30.0
# Where a run directory keeps its W&B run id, so that a resumed run continues the same W&B run.
RUN_ID_FILE = "wandb-run-id"
_ID_CHARS = string.ascii_lowercase + string.digits


def wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id for this run directory: the stored one when resuming, else a new one.

    The id is drawn from `secrets`, not `random`: the training seed fixes `random`'s state, so
    every run with the same seed would get the same id.
    """
    path = run_dir / RUN_ID_FILE
    if resume and path.is_file() and (stored := path.read_text().strip()):
        return stored
    run_id = "".join(secrets.choice(_ID_CHARS) for _ in range(8))  # wandb's own id format
    path.write_text(run_id + "\n")
    return run_id


class WandbSink:
    """Weights & Biases, one W&B run per run directory: a resumed run continues the W&B run
    (same id) it started. A W&B failure never stops training: when wandb.init fails online the
    sink retries offline, and when that fails too it logs a warning and drops the rows."""

    def __init__(
        self,
        mode: str,
        project: str,
        entity: str | None,
        name: str | None,
        group: str | None,
        tags: list[str],
        config: dict,
        run_dir: Path,
        resume: bool = False,
    ):
        import wandb

        mode = resolve_wandb_mode(mode, run_dir)
        run_id = wandb_run_id(run_dir, resume)
        self.run = None
        for attempt in [mode] + (["offline"] if mode == "online" else []):
            try:
                self.run = wandb.init(
                    mode=attempt,
                    project=project,
                    entity=entity,
                    name=name or run_dir.name,
                    group=group,
                    tags=list(tags),
                    config=config,
                    dir=str(run_dir),
                    id=run_id,
                    resume="allow" if resume else None,
                    settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S),
                )
                return
            except Exception as e:  # whatever wandb raises, training goes on (metrics.jsonl has every row)
                log.warning("wandb: starting the %s W&B run failed: %s", attempt, first_line(e))
        log.warning("wandb: continuing without W&B; metrics.jsonl has every row")

    def log(self, row: Row) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        except Exception as e:  # e.g. wandb's service process died: stop sending, keep training
            log.warning("wandb: logging failed (%s); continuing without W&B", first_line(e))
            self.run = None

    def table(self, name: str, rows: list[Row], step: int) -> None:
        """`rows` (dicts with the same keys) as a W&B table logged under `name` at `step`; values
        that are not numbers or strings (message lists) are written as JSON."""
        if self.run is None or not rows:
            return
        import wandb

        columns = list(rows[0])

        def cell(value: Any) -> Any:
            return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)

        try:
            data = [[cell(row.get(c)) for c in columns] for row in rows]
            self.run.log({name: wandb.Table(columns=columns, data=data)}, step=step)
        except Exception as e:  # as for rows: W&B failing never stops training
            log.warning("wandb: logging the %s table failed (%s); continuing without W&B", name, first_line(e))
            self.run = None

    def close(self, failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as e:
            log.warning("wandb: finishing the W&B run failed: %s", first_line(e))


class MetricLogger:
    """Fans rows out to every sink; does nothing on processes other than the main one.
    A context manager, so that sinks are closed (and the console restored) on errors too."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)

    def log(self, row: Row) -> None:
        for sink in self.sinks:
            sink.log(row)

    def table(self, name: str, rows: list[Row], step: int) -> None:
        """A table of rows (generation samples) for the sinks that keep tables (W&B)."""
        for sink in self.sinks:
            if hasattr(sink, "table"):
                sink.table(name, rows, step)

    def close(self, failed: bool = False) -> None:
        for sink in self.sinks:
            sink.close(failed)
