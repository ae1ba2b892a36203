"""Reward-model training (task=reward): the Bradley-Terry loss on the scores a sequence-classification
model gives the chosen and rejected sequences of each pair, and its metrics.

The model is `AutoModelForSequenceClassification` with one output (num_labels=1). The reward of a
sequence is its score at the last non-padding token, as transformers' sequence-classification
models pool it: the model's own forward over padded rows (one sequence per row) gives it, the
same pooling a user of final/ (or `judge=reward_model`) gets from `from_pretrained`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_cli.batch import CHOSEN, REJECTED
from dpo_cli.errors import DataError

Parts = dict[str, tuple[torch.Tensor, torch.Tensor]]  # metric name -> (sum, count), as scoring.Parts


def bradley_terry(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """The mean over pairs of the Bradley-Terry negative log-likelihood of the preference,

        loss_i = -log sigmoid(r_c,i - r_r,i - m_i) + c * (r_c,i + r_r,i)^2

    (Ouyang et al., 2022, Eq. 1; the per-pair margin m_i of Llama 2, Touvron et al., 2023, Eq. 2;
    the centring term of Eisenstein et al., 2023, weight c: TRL RewardTrainer's
    center_rewards_coefficient). `chosen`, `rejected`: (B,) rewards of the pairs' two sequences;
    `margin`: (B,) or None (0); `center_coefficient`: None or 0 = no centring. E.g. r_c = 1, r_r = 0,
    no margin: -log sigmoid(1) = 0.3133; with c = 0.1 it adds 0.1 * 1^2 = 0.1."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses.mean()


def sequence_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One reward per sequence of a padded batch (row i is sequence i), in float32: the model's
    pooled score (its last non-padding token's), from its own forward with the padding mask."""
    assert batch["input_ids"].shape[0] == batch["role"].shape[0], "reward models score padded batches"
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, 0].float()


class RewardObjective:
    """task=reward's objective, in the place of a loss: the model scores each sequence itself
    (`score`), so the loop asks for no log-probs, no reference and no extras. Its flags are
    the ones the loop reads from a loss."""

    requires_reference = False
    paired = True
    needs: frozenset[str] = frozenset()
    reads_margin = True  # data=pairs' per-pair `margin` (batch["margin"]); see `check_margins`

    def __init__(self, center_coefficient: float | None = None):
        self.center_coefficient = center_coefficient

    def __repr__(self) -> str:
        return f"BradleyTerry(center_coefficient={self.center_coefficient})"

    def score(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Parts]:
        """The batch's loss (with grad) and its metrics as (sum, count) parts, named as TRL's
        RewardTrainer names them: loss, accuracy (share of pairs whose chosen reward is higher),
        margin (mean r_c - r_r), rewards/chosen and rewards/rejected (mean rewards). The pairs'
        order is the examples' (the collator numbers CHOSEN, then REJECTED, in example order)."""
        rewards = sequence_rewards(model, batch)
        chosen, rejected = rewards[batch["role"] == CHOSEN], rewards[batch["role"] == REJECTED]
        assert chosen.shape == rejected.shape, "task=reward needs pairs"
        margin = batch["margin"].float() if "margin" in batch else None
        loss = bradley_terry(chosen, rejected, margin, self.center_coefficient)
        with torch.no_grad():
            n = torch.tensor(float(chosen.numel()), device=rewards.device)

            def total(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return values.float().sum(), n

            parts: Parts = {
                "loss": (loss.detach().float() * n, n),
                "accuracy": total(chosen > rejected),
                "margin": total(chosen - rejected),
                "rewards/chosen": total(chosen),
                "rewards/rejected": total(rejected),
            }
        return loss, parts


def check_margins(objective: object, *splits: list[dict]) -> None:
    """DataError when tokenized examples carry data=pairs' per-pair `margin` and `objective` does
    not read it (DPO-family losses): a column that changes nothing is refused, not ignored."""
    if getattr(objective, "reads_margin", False):
        return
    n = sum("margin" in example for split in splits for example in split)
    if n:
        raise DataError(
            f"{n} pairs of the data carry a 'margin' field (a per-pair margin, which only task=reward's Bradley-Terry "
            "loss reads); the DPO losses do not read it: remove the field from the rows, or train a reward model "
            "with task=reward"
        )
