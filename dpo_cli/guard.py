"""The non-finite guard: an optimizer step whose loss or gradient norm is not finite on some
process is skipped on every process and counted; `limit` such steps in a row stop the run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def all_finite(accelerator: Any, finite: torch.Tensor) -> bool:
    """Whether `finite` (1 or 0) is 1 on every process: all of them take the same branch."""
    if accelerator.num_processes > 1:
        # accelerate's reduce has no "min" (it would sum): any process's 1 - finite, by max.
        finite = 1 - accelerator.reduce(1 - finite.float(), "max")
    return bool(finite.item())


@dataclass
class Guard:
    """The guard's counters (saved in each checkpoint, so that a resumed run counts on) and its
    limit, train.max_nonfinite_steps (None or 0: never stop)."""

    limit: int | None = None
    total: int = 0  # skipped steps in the whole run: the `nonfinite_steps` metric
    consecutive: int = 0  # skipped steps since the last update

    def check(self, accelerator: Any, finite: torch.Tensor) -> bool:
        """Whether the step may update the weights: `finite` (1 or 0, this process's verdict on
        its losses and the gradient norm) is 1 on every process. A step that may not is counted."""
        if all_finite(accelerator, finite):
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        return False

    @property
    def exhausted(self) -> bool:
        """Whether the run must stop: `limit` steps in a row were skipped."""
        return bool(self.limit) and self.consecutive >= self.limit

    def state(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def restore(self, state: dict[str, int]) -> None:
        self.total = state.get("total", self.total)
        self.consecutive = state.get("consecutive", self.consecutive)

    def message(self, path: Path) -> str:
        """Why the run stopped, where its last good weights are, and what to try."""
        return (
            f"{self.limit} optimizer steps in a row had a non-finite loss or gradient norm (train.max_nonfinite_steps="
            f"{self.limit}); stopped with the last good weights in {path} (final/ not written). Likely causes: a "
            "learning rate too high (lower optimizer.lr); fp16 overflow (use bf16, or model.dtype=float32 with "
            "train.mixed_precision=fp16); empty responses or a data row that tokenizes badly (check the pair "
            "indices logged above with mode=inspect)"
        )
