"""What every loss shares: its output, its capability flags, and small reductions."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dpo_cli.logprobs import SequenceLogps
from dpo_cli.losses.modifiers import Modifier

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
        # A micro batch can hold no example a loss reads (SFT on unpaired data with no desirable
        # example): its loss is 0, not the NaN of an empty mean.
        loss=losses.mean() if losses.numel() else losses.sum(),
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


def nll_shares(logps: torch.Tensor, tokens: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Each sequence's share of a token-mean NLL, (B,).

    NLL = -sum_i logps_i / D, D = `denominator`: by default this batch's tokens (sum_i tokens_i),
    the mean over all tokens of the batch, as TRL's `sft` loss and CPO/ORPO's NLL term compute
    it per batch. In training and evaluation D is the batch's share of its optimizer step's (or
    eval set's) tokens (`SequenceLogps.nll_tokens`), so that the NLL is one token mean over the
    whole step: a micro batch of long responses then weighs what its tokens weigh, whatever the
    micro batch size, accumulation or number of processes. Sequence i's share is
    -logps_i * B / D, so that the mean over sequences is exactly that NLL and it combines with
    per-pair losses by a plain mean.
    """
    d = tokens.sum().clamp(min=1) if denominator is None else max(denominator, 1.0)
    return -logps * logps.shape[0] / d


def chosen_nll(policy: SequenceLogps) -> torch.Tensor:
    """`nll_shares` of the chosen responses' tokens."""
    chosen = policy["chosen"]
    return nll_shares(chosen.logps, chosen.tokens, policy.nll_tokens)


def chosen_whole_nll(policy: SequenceLogps) -> torch.Tensor:
    """`nll_shares` over every token of the chosen sequences but the first (prompt and
    response), as TRL's ORPOTrainer and the ORPO authors' code take it by default."""
    chosen = policy["chosen"]
    assert chosen.whole is not None and chosen.whole_tokens is not None, "needs batch.WHOLE"
    return nll_shares(chosen.whole, chosen.whole_tokens, policy.nll_whole_tokens)


def policy_means(policy: SequenceLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean log-probs (a_w, a_l) of the chosen and rejected responses."""
    chosen, rejected = policy["chosen"], policy["rejected"]
    return mean_logps(chosen.logps, chosen.tokens), mean_logps(rejected.logps, rejected.tokens)


def smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x): cross-entropy against label 1 - eps."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def check_smoothing(problems: list[str], value: float, name: str = "label_smoothing") -> None:
    if not 0 <= value < 0.5:
        problems.append(f"{name}={value} must be in [0, 0.5) (the assumed share of flipped labels)")


class Loss:
    """Base of every loss: capability flags the training loop reads instead of loss names.

    requires_reference: the loss reads reference log-probs; without it no reference is built.
    paired: chosen[i] and rejected[i] must be the two responses of one pair (False: the loss
        also works on unpaired desirable/undesirable examples, as KTO does).
    needs: optional per-sequence values (`batch.SHARED`, `batch.WPO`, `batch.WHOLE`) and batch
        parts (`batch.KL_ROWS`) that the data and log-prob stages must provide: the class's own,
        plus those of its modifiers that are on.
    accepts: the modifier classes (`modifiers`) whose keys the loss takes as keyword arguments
        (`**modifiers` of its constructor); `modifiers` holds them built, in that order.
    """

    requires_reference: bool = True
    paired: bool = True
    needs: frozenset[str] = frozenset()
    accepts: tuple[type[Modifier], ...] = ()
    modifiers: tuple[Modifier, ...] = ()

    def modify(self, problems: list[str], keys: dict[str, Any]) -> None:
        """Build every accepted modifier from its keys in `keys` (the others at their defaults),
        add their range problems to `problems`, and their needs to the loss's. A key that no
        accepted modifier owns is a TypeError, as an unknown keyword argument is."""
        owner = {key: m for m in self.accepts for key in m.keys()}
        unknown = [key for key in keys if key not in owner]
        if unknown:
            params = inspect.signature(type(self)).parameters.values()
            allowed = ", ".join([p.name for p in params if p.kind is not p.VAR_KEYWORD] + list(owner))
            name = type(self).__name__
            raise TypeError("\n".join(f"{key} is not a parameter of {name}; allowed: {allowed}" for key in unknown))
        self.modifiers = tuple(m(**{k: v for k, v in keys.items() if owner[k] is m}) for m in self.accepts)
        for m in self.modifiers:
            problems.extend(m.problems())
        self.needs = frozenset(type(self).needs).union(*(m.needs for m in self.modifiers))

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        """The batch's loss. `reduce` turns a batch statistic into its mean over processes
        (KTO's KL estimate); evaluation passes `local`, as processes evaluate independently."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = inspect.signature(type(self).__init__).parameters.values()
        names = [p.name for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD]
        args = [f"{n}={getattr(self, n)!r}" for n in names if hasattr(self, n)]
        args += [repr(m) for m in self.modifiers]
        return f"{type(self).__name__}({', '.join(args)})"
