"""Loss and metrics of one batch, and evaluation over the held-out split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dpo_cli.data.batching import eval_batches
from dpo_cli.data.collate import collate
from dpo_cli.data.tokenize import Tokenized
from dpo_cli.logprobs import concatenated_forward
from dpo_cli.losses import LossOutput

# Metric names follow TRL's DPOTrainer so curves compare across tools.
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


def batch_loss(
    policy: torch.nn.Module,
    reference: Callable[[dict], Any] | None,
    loss_fn: Callable[..., LossOutput],
    batch: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss of the batch (with grad) and the per-batch sums of PAIR_METRICS (no grad)."""
    fwd = concatenated_forward(policy, batch)
    ref = reference(batch) if loss_fn.requires_reference else None
    out = loss_fn(fwd.logps, ref)
    with torch.no_grad():
        sums = torch.stack(
            [
                out.losses.sum(),
                out.chosen_rewards.sum(),
                out.rejected_rewards.sum(),
                (out.chosen_rewards > out.rejected_rewards).float().sum(),
                (out.chosen_rewards - out.rejected_rewards).sum(),
                fwd.logps.chosen.sum(),
                fwd.logps.rejected.sum(),
                fwd.mean_logits_chosen.sum(),
                fwd.mean_logits_rejected.sum(),
            ]
        ).float()
    return out.losses.mean(), sums


def means(sums: torch.Tensor, n_pairs: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """PAIR_METRICS averaged over pairs (sums and n_pairs already reduced over processes)."""
    values = (sums / n_pairs.clamp(min=1)).tolist()
    return {prefix + name: v for name, v in zip(PAIR_METRICS, values, strict=True)}


@torch.no_grad()
def evaluate(
    policy: torch.nn.Module,
    reference: Callable[[dict], Any] | None,
    loss_fn: Callable[..., LossOutput],
    pairs: list[Tokenized],
    accelerator: Any,
    micro_batch_size: int,
    pad_id: int,
) -> dict[str, float]:
    """`eval_`-prefixed PAIR_METRICS over all of `pairs`, each pair seen by one process.

    `policy` should be the unwrapped model: processes may hold different numbers of eval
    batches, and a DDP-wrapped forward could wait on a collective the others never join.
    The only synchronization is the final reduce.
    """
    was_training = policy.training
    policy.eval()
    sums = torch.zeros(len(PAIR_METRICS), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    for idx in eval_batches(len(pairs), accelerator.process_index, accelerator.num_processes, micro_batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate([pairs[i] for i in idx], pad_id).items()}
        with accelerator.autocast():
            _, batch_sums = batch_loss(policy, reference, loss_fn, batch)
        sums += batch_sums
        count += len(idx)
    policy.train(was_training)
    return means(accelerator.reduce(sums, "sum"), accelerator.reduce(count, "sum"), prefix="eval_")
