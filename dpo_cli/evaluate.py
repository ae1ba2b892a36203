"""Evaluation over the held-out split: the loss's preference metrics, each example seen by one
process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dpo_cli.data.batching import eval_batches
from dpo_cli.data.collate import chosen_token_means
from dpo_cli.data.tokenize import Tokenized
from dpo_cli.distributed import in_lockstep
from dpo_cli.lmhead import Head
from dpo_cli.losses import Loss
from dpo_cli.reward import RewardObjective
from dpo_cli.scoring import Averages, batch_loss, make_batch


@torch.no_grad()
def evaluate(
    policy: torch.nn.Module,
    reference: Callable[..., Any] | None,
    loss_fn: Loss | RewardObjective,
    examples: list[Tokenized],
    accelerator: Any,
    micro_batch_size: int,
    pad_id: int,
    layout: str = "padded",
    head: Head | None = None,
) -> dict[str, float]:
    """`eval_`-prefixed metrics over all of `examples`, each seen by one process.

    `policy` should be the unwrapped model: processes may hold different numbers of eval
    batches, and a DDP-wrapped forward (or a loss reducing a statistic over processes) could
    wait on a collective the others never join. So batch statistics stay local here (KTO's
    KL estimate is per batch; a last batch of one example takes its mismatched completion from
    another eval example, see `make_batch`) and the only synchronization is the final reduce. Sharded weights (FSDP, ZeRO-3) make every forward
    a collective: processes with fewer batches then run weight-0 ones to keep in step.
    """
    was_training = policy.training
    policy.eval()
    sums = Averages()
    batches = eval_batches(len(examples), accelerator.process_index, accelerator.num_processes, micro_batch_size)
    # A process with no eval examples (fewer than processes) still needs every metric name for
    # the reduce: it scores one example with weight 0.
    fill = [0] * min(2, len(examples))
    token_means = chosen_token_means(examples)  # a token-mean NLL is one mean over the eval set
    for idx, weight in in_lockstep(batches, accelerator, fill) or [(fill, 0)]:
        batch = make_batch(examples, idx, pad_id, loss_fn, accelerator.device, layout)
        with accelerator.autocast():
            _, parts = batch_loss(policy, reference, loss_fn, batch, head=head, token_means=token_means)
        sums.add(parts, weight)
    policy.train(was_training)
    return sums.reduce(accelerator, prefix="eval_")
