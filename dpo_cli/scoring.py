"""One batch scored: collated for the loss (`make_batch`), its loss with gradients and its
metrics as (sum, count) parts (`batch_loss`), and metric means over batches and processes
(`Averages`). The training step and evaluation both score batches this way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dpo_cli.data.collate import collate
from dpo_cli.data.tokenize import Tokenized
from dpo_cli.lmhead import Head
from dpo_cli.logprobs import KL, KL_ROWS, SHARED, WHOLE, batch_logps
from dpo_cli.losses import Loss
from dpo_cli.losses.base import Reduce, local
from dpo_cli.reward import RewardObjective

Parts = dict[str, tuple[torch.Tensor, torch.Tensor]]  # metric name -> (sum, count)
REFERENCE_EXTRAS = frozenset({SHARED})


def batch_loss(
    policy: torch.nn.Module,
    reference: Callable[..., Any] | None,
    loss_fn: Loss | RewardObjective,
    batch: dict[str, torch.Tensor],
    reduce: Reduce = local,
    head: Head | None = None,
    token_means: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, Parts]:
    """The batch's loss (with grad) and its metrics as (sum, count) parts (no grad); task=reward's
    objective scores the batch itself (`reward.RewardObjective.score`). Metric names and definitions follow TRL's DPOTrainer, so curves compare across tools:
    rewards/* and logps/* are means over sequences of that role (logps/* are the log-probs the
    loss works with: summed, or per-token means for SimPO and ORPO); with a reference,
    logps/chosen_change is the mean of policy - reference summed log-prob of the chosen
    responses and logps/chosen_below_reference the share of them the policy finds less likely; logits/* are means over all
    response tokens of that role in the batch (token-weighted); rewards/accuracies and
    rewards/margins are over pairs (unpaired data: margins = mean chosen - mean rejected
    reward, no accuracy). The loss is weighted by the batch's examples (pairs, or unpaired
    examples), so the mean over batches is the mean over examples. `head`: the policy's chunked
    LM head (None: full logits). `token_means`: the chosen response (and whole-sequence) tokens
    per example of the whole optimizer step or eval set (`collate.chosen_token_means`), so that
    a token-mean NLL term is one mean over all of them (None: over this batch's own tokens).
    """
    if isinstance(loss_fn, RewardObjective):
        return loss_fn.score(policy, batch)
    # The reference needs only what losses read from it (LD-DPO's shared part); WPO's weights
    # and the whole-sequence NLL come from the policy alone. It runs first: its forward holds
    # no graph, so its memory is free again before the policy's activations are built.
    ref = reference(batch, loss_fn.needs & REFERENCE_EXTRAS) if loss_fn.requires_reference else None
    fwd = batch_logps(policy, batch, loss_fn.needs, head=head)
    lp, (n_examples, paired) = fwd.logps, examples_in(batch)
    if token_means is not None:  # this batch's share of the step's tokens
        lp.nll_tokens, lp.nll_whole_tokens = (n_examples * m for m in token_means)
    out, chosen, rejected = loss_fn(lp, ref, reduce), lp["chosen"], lp["rejected"]
    with torch.no_grad():
        count = torch.tensor(float(n_examples), device=out.loss.device)

        def mean_of(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return values.float().sum(), torch.tensor(float(values.numel()), device=values.device)

        parts: Parts = {
            "loss": (out.loss.detach().float() * count, count),
            "rewards/chosen": mean_of(out.chosen_rewards),
            "rewards/rejected": mean_of(out.rejected_rewards),
            "logps/chosen": mean_of(chosen.logps if out.chosen_logps is None else out.chosen_logps),
            "logps/rejected": mean_of(rejected.logps if out.rejected_logps is None else out.rejected_logps),
            "logits/chosen": (fwd.logit_sums_chosen.sum(), chosen.tokens.sum()),
            "logits/rejected": (fwd.logit_sums_rejected.sum(), rejected.tokens.sum()),
        }
        if paired:
            parts["rewards/accuracies"] = mean_of(out.chosen_rewards > out.rejected_rewards)
            parts["rewards/margins"] = mean_of(out.chosen_rewards - out.rejected_rewards)
        if ref is not None:
            # DPO's known failure mode: the chosen response's likelihood falls too (summed log-probs,
            # whatever the loss works with), which margins and accuracy cannot show.
            parts["logps/chosen_change"] = mean_of(chosen.logps.detach() - ref["chosen"].logps)
            parts["logps/chosen_below_reference"] = mean_of(chosen.logps.detach() < ref["chosen"].logps)
        for name, value in out.metrics.items():
            parts[name] = (value.float() * count, count)
    return out.loss, parts


def examples_in(batch: dict[str, torch.Tensor]) -> tuple[int, bool]:
    """(number of examples, whether they are pairs): a pair gives two non-KL rows, an unpaired
    example one."""
    rows = batch["example"][batch["role"] != KL]
    n = int(rows.unique().numel())
    return n, rows.numel() == 2 * n


class Averages:
    """Metric sums and counts accumulated over batches; `reduce` sums them over processes and
    divides, so every metric is a mean over all examples (or tokens) that every process saw."""

    def __init__(self) -> None:
        self.parts: Parts = {}

    def add(self, parts: Parts, scale: int = 1) -> None:
        """Add a batch's parts; scale 0 adds its metric names with nothing counted."""
        for name, (s, c) in parts.items():
            if scale == 0:  # zeros, not 0 * value: a NaN times 0 is still NaN
                s, c = torch.zeros_like(s), torch.zeros_like(c)
            if name in self.parts:
                old_s, old_c = self.parts[name]
                self.parts[name] = (old_s + s, old_c + c)
            else:
                self.parts[name] = (s.clone(), c.clone())

    def reduce(self, accelerator: Any, prefix: str = "") -> dict[str, float]:
        # Every process holds the same names (they depend only on the loss and the data's kind),
        # so one stacked all-reduce serves them all.
        names = sorted(self.parts)
        if not names:
            return {}
        stacked = torch.stack([torch.stack([s.float(), c.float()]) for s, c in (self.parts[n] for n in names)])
        totals = accelerator.reduce(stacked, "sum").tolist()
        row = {prefix + n: s / c for n, (s, c) in zip(names, totals, strict=True) if c > 0}
        if (
            prefix + "rewards/margins" not in row
            and prefix + "margin" not in row  # task=reward's rows carry their own
            and {prefix + "rewards/chosen", prefix + "rewards/rejected"} <= row.keys()
        ):
            row[prefix + "rewards/margins"] = row[prefix + "rewards/chosen"] - row[prefix + "rewards/rejected"]
        return row

    def clear(self) -> None:
        self.parts = {}


def make_batch(
    dataset: list[Tokenized], indices: list[int], pad_id: int, loss_fn: Loss, device: Any, layout: str = "padded"
) -> dict[str, torch.Tensor]:
    """collate() of `dataset[i] for i in indices` in `layout` for this loss (with KL rows and
    whole-sequence targets when it needs them), carrying the dataset indices, moved to `device`.
    KL rows of a batch of one example take the previous example's responses (the next one's
    for the first): mismatched, as KTO's reference point needs. (Training batches have at
    least two examples; the last eval batch may have one.)"""
    needs = loss_fn.needs
    examples = [dataset[i] for i in indices]
    donor = None
    if KL_ROWS in needs and len(indices) == 1 and len(dataset) > 1:
        donor = dataset[indices[0] - 1 if indices[0] > 0 else 1]
    batch = collate(
        examples, pad_id, kl=KL_ROWS in needs, index=list(indices), layout=layout, whole=WHOLE in needs, kl_donor=donor
    )
    return {k: v.to(device) for k, v in batch.items()}
