"""What every loss shares: its output, its capability flags, and small reductions."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dpo_cli.logprobs import SequenceLogps

Reduce = Callable[[torch.Tensor], torch.Tensor]


def local(x: torch.Tensor) -> torch.Tensor:
    """The default batch-statistic reduction: this process's value (see `Loss.__call__`)."""
    return x


@dataclass
class LossOutput:
    """What a loss returns for one batch.

    loss: the scalar the optimizer minimises (with grad): the mean of `losses`, or for a
        combination the weighted sum of its terms' losses.
    chosen_rewards, rejected_rewards: detached implicit rewards, one per CHOSEN / REJECTED
        sequence; their meaning is each loss's own (its docstring says).
    metrics: extra detached scalars logged under these names (`kl`, `loss/<term>`, ...).
    losses: the per-example values whose mean is `loss` (None for combinations).
    chosen_logps, rejected_logps: the policy log-probs the loss works with, when they are not
        the plain summed ones (per-token means, LD-weighted sums), so that `logps/*` logs what
        TRL logs for the same loss; None = the summed log-probs.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    losses: torch.Tensor | None = None
    chosen_logps: torch.Tensor | None = None
    rejected_logps: torch.Tensor | None = None


def output(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    **metrics: torch.Tensor,
) -> LossOutput:
    """A LossOutput whose loss is the mean of the per-example `losses`; `logps` = the (chosen,
    rejected) log-probs to log when they are not the summed ones."""
    return LossOutput(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        metrics={k: v.detach() for k, v in metrics.items()},
        losses=losses,
        chosen_logps=None if logps is None else logps[0].detach(),
        rejected_logps=None if logps is None else logps[1].detach(),
    )


def raise_problems(problems: list[str]) -> None:
    """One ValueError, one line per problem ("name=value ..."); config validation prefixes each
    line with the loss's config key (loss., loss.terms.<name>.)."""
    if problems:
        raise ValueError("\n".join(problems))


def check_beta(problems: list[str], beta: float, typical: str = "0.01 to 0.5") -> None:
    if not beta > 0:
        problems.append(f"beta={beta} must be > 0 (typical: {typical})")


def mean_logps(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token mean log-prob of each sequence (length normalisation); 0 tokens count as 1."""
    return logps / tokens.clamp(min=1)


def chosen_nll(policy: SequenceLogps) -> torch.Tensor:
    """Each pair's share of the batch's token-mean NLL of the chosen responses, (B,).

    NLL = -sum_i log pi(y_w,i|x_i) / sum_i |y_w,i|: the mean over all chosen response tokens
    of the batch, as TRL's `sft` loss and CPO/ORPO's NLL term compute it. Pair i's share is
    -log pi(y_w,i|x_i) * B / sum_i |y_w,i|, so that the mean over pairs is exactly that NLL and
    it combines with per-pair losses by a plain mean.
    """
    n = policy.chosen.shape[0]
    return -policy.chosen * n / policy.chosen_tokens.sum().clamp(min=1)


def chosen_whole_nll(policy: SequenceLogps) -> torch.Tensor:
    """`chosen_nll` over every token of the chosen sequences but the first (prompt and
    response), as TRL's ORPOTrainer and the ORPO authors' code take it by default."""
    assert policy.chosen_whole is not None and policy.chosen_whole_tokens is not None, "needs logprobs.WHOLE"
    n = policy.chosen_whole.shape[0]
    return -policy.chosen_whole * n / policy.chosen_whole_tokens.sum().clamp(min=1)


class Loss:
    """Base of every loss: capability flags the training loop reads instead of loss names.

    requires_reference: the loss reads reference log-probs; without it no reference is built.
    paired: chosen[i] and rejected[i] must be the two responses of one pair (False: the loss
        also works on unpaired desirable/undesirable examples, as KTO does).
    needs: optional per-sequence values (`logprobs.SHARED`, `logprobs.WPO`) and batch parts
        (`logprobs.KL_ROWS`) that the data and log-prob stages must provide.
    """

    requires_reference: bool = True
    paired: bool = True
    needs: frozenset[str] = frozenset()

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        """The batch's loss. `reduce` turns a batch statistic into its mean over processes
        (KTO's KL estimate); evaluation passes `local`, as processes evaluate independently."""
        raise NotImplementedError

    def __repr__(self) -> str:
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in names if hasattr(self, n))
        return f"{type(self).__name__}({args})"
