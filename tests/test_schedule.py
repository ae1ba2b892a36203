"""The learning-rate schedule: no step at learning rate 0, at either end."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_metrics

from dpo_cli.schedule import NAMES, lr_factor, make_scheduler


def _lrs(name: str, warmup: int, total: int, lr: float = 1.0) -> list[float]:
    """The learning rate each of `total` optimizer steps trains at, as the loop reads it."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make_scheduler(optimizer, name, warmup, total)
    seen = []
    for _ in range(total):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_warmup_starts_at_lr_over_warmup_steps_and_reaches_lr(name):
    """Step 1 of a 4-step warmup trains at lr / 4 (transformers' schedules: 0), step 4 at lr."""
    lrs = _lrs(name, warmup=4, total=10, lr=2e-3)
    assert lrs[:4] == pytest.approx([0.5e-3, 1e-3, 1.5e-3, 2e-3])
    assert lrs[4] == pytest.approx(2e-3)  # the decay starts from the peak


def test_the_last_step_still_trains():
    """Cosine and linear decay end one step short of 0: the last step's lr is positive."""
    total, warmup = 10, 2
    cosine = _lrs("cosine", warmup, total)
    linear = _lrs("linear", warmup, total)
    assert cosine[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert linear[-1] == pytest.approx(1 / 8)
    assert cosine[-1] > 0 and linear[-1] > 0
    assert _lrs("constant", warmup, total)[-1] == 1.0


def test_no_warmup_starts_at_the_peak():
    assert _lrs("cosine", 0, 5)[0] == 1.0
    assert lr_factor("linear", 0, 0, 5) == 1.0


def test_an_unknown_schedule_fails_when_built():
    param = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        make_scheduler(torch.optim.SGD([param], lr=1.0), "step", 2, 10)


@pytest.mark.integration
def test_the_first_step_of_a_default_run_changes_the_weights(train_run):
    """With the default warmup (10% of the steps), step 1 used to train at lr 0, so step 2's
    loss was still exactly log 2; now the first row's lr is positive and step 2 has moved."""
    _, run_dir = train_run(["train.max_steps=10", "logger.log_every=1", "train.eval_every=null"])
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert rows[0]["lr"] == pytest.approx(1e-3)  # warmup of 1 step: lr / 1
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference
    assert abs(rows[1]["loss"] - math.log(2)) > 1e-4
