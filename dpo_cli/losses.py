"""Preference losses.

A loss is a small object called with the policy's and (if it needs one) the reference's
per-sequence log-probabilities, and returns per-pair losses and implicit rewards. Capability
properties tell the training loop what the loss needs; the loop never compares loss names.
Adding a variant means a new class here plus a YAML file in `conf/loss/`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SequenceLogps:
    """Summed response log-probs and response token counts, each of shape (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class LossOutput:
    """Per-pair losses (B,), and detached rewards for chosen and rejected responses (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class DPOLoss:
    """Direct Preference Optimization, sigmoid form (Rafailov et al., 2023, Eq. 7).

    With summed response log-probs, for each pair:

        h      = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
        loss   = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
        reward = beta * (log pi(y|x) - log ref(y|x))           (detached, one per response)

    `label_smoothing` = eps > 0 is conservative DPO (cDPO; Mitchell, 2023): it assumes a
    fraction eps of the labels are flipped. eps = 0 is plain DPO. Log-probs are summed over
    the response tokens (no length normalization); the loss is returned per pair and the
    training loop takes the mean over pairs.
    """

    requires_reference = True
    length_normalized = False

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        problems = []
        if not beta > 0:
            problems.append(f"beta={beta} must be > 0 (typical: 0.01 to 0.5)")
        if not 0 <= label_smoothing < 0.5:
            problems.append(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
        if problems:
            raise ValueError("\n".join(problems))  # one problem per line, each "name=value ..."
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None) -> LossOutput:
        assert reference is not None, "DPOLoss requires reference log-probs"
        chosen_ratio = policy.chosen - reference.chosen
        rejected_ratio = policy.rejected - reference.rejected
        logits = self.beta * (chosen_ratio - rejected_ratio)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return LossOutput(
            losses=losses,
            chosen_rewards=(self.beta * chosen_ratio).detach(),
            rejected_rewards=(self.beta * rejected_ratio).detach(),
        )

    def __repr__(self) -> str:
        return f"DPOLoss(beta={self.beta}, label_smoothing={self.label_smoothing})"
