"""Metric sinks: metrics.jsonl, a console progress bar, and Weights & Biases.

Only the main process opens sinks; rows arrive already averaged over processes.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

Row = dict[str, Any]


def _step_of(line: str, default: int) -> int:
    """The step of a metrics.jsonl line; `default` for a line a crash cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return default


class JsonlSink:
    """One JSON object per line: {"step": N, ...metrics}. Flushed per row so a crash loses nothing."""

    def __init__(self, path: Path, resume_step: int | None = None):
        if resume_step is not None and path.exists():
            # Rows logged after the checkpoint we resume from will be logged again: drop them
            # so that the file reads like one uninterrupted run.
            kept = [
                line for line in path.read_text().splitlines() if _step_of(line, default=resume_step + 1) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")

    def log(self, row: Row) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self, failed: bool = False) -> None:
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
        if "eval_loss" in row:
            return
        self.bar.update(row["step"] - self.bar.n)
        shown = {"loss": f"{row['loss']:.4f}"}
        if "rewards/accuracies" in row:  # pairs only: unpaired data has no accuracy
            shown["acc"] = f"{row['rewards/accuracies']:.3f}"
        self.bar.set_postfix(shown, refresh=False)

    def close(self, failed: bool = False) -> None:
        self._redirect.__exit__(None, None, None)
        self.bar.close()


def wandb_credentials() -> bool:
    """Whether an API key is configured (env var or netrc), so online mode will not prompt."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
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
    ):
        import wandb

        if mode == "online" and not wandb_credentials():
            log.warning(
                "wandb: no API key configured (WANDB_API_KEY or `wandb login`); logging offline to %s",
                run_dir / "wandb",
            )
            mode = "offline"
        self.run = wandb.init(
            mode=mode,
            project=project,
            entity=entity,
            name=name or run_dir.name,
            group=group,
            tags=list(tags),
            config=config,
            dir=str(run_dir),
        )

    def log(self, row: Row) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


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

    def close(self, failed: bool = False) -> None:
        for sink in self.sinks:
            sink.close(failed)
