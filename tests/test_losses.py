"""DPOLoss against numbers worked out by hand, plus the properties the formula implies."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from dpo_cli.losses import DPOLoss, SequenceLogps


def logps(chosen: list[float], rejected: list[float], requires_grad: bool = False) -> SequenceLogps:
    """SequenceLogps with made-up token counts (DPOLoss sums, so it must not use them)."""
    n = len(chosen)
    return SequenceLogps(
        chosen=torch.tensor(chosen, dtype=torch.float64, requires_grad=requires_grad),
        rejected=torch.tensor(rejected, dtype=torch.float64, requires_grad=requires_grad),
        chosen_tokens=torch.full((n,), 7.0),
        rejected_tokens=torch.full((n,), 3.0),
    )


def test_dpo_loss_hand_worked():
    """Two pairs, beta = 0.1.

    Pair 0: policy (chosen, rejected) = (-10, -14), reference = (-12, -11)
        chosen ratio   = -10 - (-12) =  2
        rejected ratio = -14 - (-11) = -3
        h = 2 - (-3) = 5, beta * h = 0.5
        loss = -log sigmoid(0.5) = log(1 + exp(-0.5)) = log(1.6065307) = 0.4740770
        rewards: chosen 0.1 * 2 = 0.2, rejected 0.1 * -3 = -0.3

    Pair 1: policy = (-20, -15), reference = (-18, -23)
        chosen ratio = -2, rejected ratio = 8, h = -10, beta * h = -1
        loss = log(1 + exp(1)) = log(3.7182818) = 1.3132617
        rewards: chosen -0.2, rejected 0.8
    """
    out = DPOLoss(beta=0.1)(logps([-10.0, -20.0], [-14.0, -15.0]), logps([-12.0, -18.0], [-11.0, -23.0]))
    expected = torch.tensor([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))], dtype=torch.float64)
    assert_close(out.losses, expected)
    assert_close(out.losses, torch.tensor([0.4740770, 1.3132617], dtype=torch.float64), rtol=0, atol=1e-7)
    assert_close(out.chosen_rewards, torch.tensor([0.2, -0.2], dtype=torch.float64))
    assert_close(out.rejected_rewards, torch.tensor([-0.3, 0.8], dtype=torch.float64))


def test_zero_margin_gives_log2():
    """h = 0 (policy moved chosen and rejected alike): loss = -log sigmoid(0) = log 2, for any beta."""
    for beta in (0.01, 0.1, 2.0):
        out = DPOLoss(beta=beta)(logps([-3.0, -50.0], [-8.0, -1.0]), logps([-4.0, -49.0], [-9.0, 0.0]))
        assert_close(out.losses, torch.full((2,), math.log(2), dtype=torch.float64))


def test_label_smoothing_zero_is_plain_dpo():
    """eps = 0 drops the -eps * log sigmoid(-beta h) term: the loss is softplus(-beta h)."""
    policy, ref = logps([-10.0, -20.0, -5.0], [-14.0, -15.0, -5.0]), logps([-12.0, -18.0, -7.0], [-11.0, -23.0, -2.0])
    smoothed0 = DPOLoss(beta=0.3, label_smoothing=0.0)(policy, ref).losses
    h = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
    assert_close(smoothed0, torch.nn.functional.softplus(-0.3 * h))


def test_label_smoothing_hand_worked():
    """cDPO, beta = 0.1, eps = 0.2, pair 0 of the hand-worked test: beta * h = 0.5.

    -log sigmoid(0.5)  = log(1 + exp(-0.5)) = 0.4740770
    -log sigmoid(-0.5) = log(1 + exp(0.5))  = 0.9740770
    loss = 0.8 * 0.4740770 + 0.2 * 0.9740770 = 0.3792616 + 0.1948154 = 0.5740770
    """
    out = DPOLoss(beta=0.1, label_smoothing=0.2)(logps([-10.0], [-14.0]), logps([-12.0], [-11.0]))
    expected = 0.8 * math.log(1 + math.exp(-0.5)) + 0.2 * math.log(1 + math.exp(0.5))
    assert_close(out.losses, torch.tensor([expected], dtype=torch.float64))
    assert_close(out.losses, torch.tensor([0.5740770], dtype=torch.float64), rtol=0, atol=1e-7)
    # Smoothing changes the loss, not the rewards.
    assert_close(out.chosen_rewards, torch.tensor([0.2], dtype=torch.float64))
    assert_close(out.rejected_rewards, torch.tensor([-0.3], dtype=torch.float64))


def test_rewards_carry_no_gradient_loss_does():
    policy = logps([-10.0, -20.0], [-14.0, -15.0], requires_grad=True)
    out = DPOLoss(beta=0.1)(policy, logps([-12.0, -18.0], [-11.0, -23.0]))
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    # d loss / d chosen = -beta * sigmoid(-beta h): pair 0 has beta h = 0.5.
    assert_close(policy.chosen.grad[0], torch.tensor(-0.1 / (1 + math.exp(0.5)), dtype=torch.float64))
    assert_close(policy.rejected.grad, -policy.chosen.grad)


def test_loss_decreases_as_margin_grows():
    margins = torch.linspace(-20, 20, 41, dtype=torch.float64)
    zeros = torch.zeros_like(margins)
    policy = SequenceLogps(chosen=margins, rejected=zeros, chosen_tokens=zeros, rejected_tokens=zeros)
    ref = SequenceLogps(chosen=zeros, rejected=zeros, chosen_tokens=zeros, rejected_tokens=zeros)
    losses = DPOLoss(beta=0.1)(policy, ref).losses
    assert torch.all(losses[1:] < losses[:-1])
    assert torch.all(losses > 0)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
    ],
)
def test_invalid_arguments_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DPOLoss(**kwargs)


def test_capabilities():
    loss = DPOLoss()
    assert loss.requires_reference is True
    assert loss.length_normalized is False
