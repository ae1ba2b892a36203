"""The learning-rate schedule: linear warmup, then cosine or linear decay, or constant.

Step k (0-based) of a warmup of W steps trains at lr * (k + 1) / W, so the first update is
taken at lr / W and the last warmup step at the full lr. transformers' schedules start at
k / W, which makes step 1 an update at learning rate 0: a wasted step, and on a short run a
second step whose loss is still exactly log 2. The original DPO code starts above zero too
(`min(1, (k + 1) / (W + 1))`). After the warmup, the decay runs over the remaining steps
without reaching 0 at the last one (progress (k - W) / (n - W) < 1), so that no step is spent
at learning rate 0 at either end.
"""

from __future__ import annotations

import math

import torch

from dpo_cli.errors import ConfigError

NAMES = ("cosine", "linear", "constant", "constant_with_warmup")


def lr_factor(name: str, step: int, warmup: int, total: int) -> float:
    """The multiple of the peak learning rate that 0-based optimizer step `step` of `total`
    trains at, after `warmup` warmup steps."""
    if step < warmup:
        return (step + 1) / warmup
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(NAMES)}")


def warmup_steps(steps: int | None, ratio: float, n_steps: int) -> int:
    """The warmup's length in optimizer steps: `scheduler.warmup_steps`, else `warmup_ratio` of
    the run's `n_steps`; a ConfigError when it would take the whole run."""
    warmup = steps if steps is not None else int(ratio * n_steps)
    if warmup >= n_steps:
        raise ConfigError(
            [
                f"warmup takes {warmup} of the run's {n_steps} optimizer steps, so the learning rate "
                "never reaches optimizer.lr; lower scheduler.warmup_steps / scheduler.warmup_ratio "
                "or raise train.max_steps"
            ]
        )
    return warmup


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step; its state (the step count) is checkpointed."""
    lr_factor(name, warmup, warmup, total)  # an unknown name fails here, not at the first step after warmup
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(name, step, warmup, total))
