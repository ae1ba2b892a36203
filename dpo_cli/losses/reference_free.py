"""Losses that need no reference model: SimPO, CPO, ORPO, SimPER and SFT.

No reference is built or kept in memory when a run's losses are all from here. Notation as in
`paired`: pi_w, pi_l are summed response log-probs, |y| response lengths in tokens, and
a_w = pi_w / |y_w|, a_l = pi_l / |y_l| the per-token **mean** log-probs. The NLL term is the
token-mean negative log-likelihood of the batch's chosen responses (`base.chosen_nll`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpo_cli.logprobs import WHOLE, SequenceLogps
from dpo_cli.losses.base import (
    Loss,
    LossOutput,
    Reduce,
    check_beta,
    check_smoothing,
    chosen_nll,
    chosen_whole_nll,
    local,
    output,
    policy_means,
    raise_problems,
    smoothed_sigmoid,
)


def _check_weight(problems: list[str], name: str, value: float) -> None:
    if not value >= 0:
        problems.append(f"{name}={value} must be >= 0 (0 turns the term off)")


class ReferenceFreeLoss(Loss):
    requires_reference = False


class SimPOLoss(ReferenceFreeLoss):
    """SimPO (Meng et al., 2024, Eq. 6): length-normalised, reference-free, with a margin:

        loss = -log sigmoid(beta (a_w - a_l) - gamma)  [+ nll_weight * NLL]

    Per-token **mean** log-probs; no reference. `label_smoothing` gives the conservative
    form; `nll_weight` > 0 adds the NLL of the chosen responses (CPO-SimPO). Rewards are
    beta * a. Equals TRL's CPOTrainer with loss_type="simpo", simpo_gamma=gamma,
    cpo_alpha=nll_weight. The authors' settings: beta 2.0 to 2.5 (10 for Gemma-2 and their
    Llama-3-Instruct v0.2), gamma/beta 0.1 to 0.8 (0.5 to 0.55 for Llama-3, 0.1 for
    Mistral-Instruct), and a learning rate far below DPO's (3e-7 to 1e-6).

    Keys:
        beta: reward scale on mean log-probs; > 0 (authors: 2.0 to 2.5; 10 for Gemma-2).
        gamma: target reward margin, >= 0 (authors: gamma/beta 0.1 to 0.8, 0.5 to 0.55 for
            Llama-3).
        label_smoothing: assumed flip rate, in [0, 0.5).
        nll_weight: weight of the chosen responses' NLL, >= 0; > 0 gives CPO-SimPO (e.g. 1.0).
    """

    def __init__(self, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0, nll_weight: float = 0.0):
        problems: list[str] = []
        check_beta(problems, beta, typical="2.0 to 10")
        if not gamma >= 0:
            problems.append(f"gamma={gamma} must be >= 0 (the target reward margin; gamma/beta 0.3 to 0.8)")
        check_smoothing(problems, label_smoothing)
        _check_weight(problems, "nll_weight", nll_weight)
        raise_problems(problems)
        self.beta, self.gamma = float(beta), float(gamma)
        self.label_smoothing, self.nll_weight = float(label_smoothing), float(nll_weight)

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        aw, al = policy_means(policy)
        losses = smoothed_sigmoid(self.beta * (aw - al) - self.gamma, self.label_smoothing)
        metrics = {}
        if self.nll_weight > 0:
            nll = chosen_nll(policy)
            losses = losses + self.nll_weight * nll
            metrics["nll_loss"] = nll.mean()
        return output(losses, self.beta * aw, self.beta * al, (aw, al), **metrics)


class CPOLoss(ReferenceFreeLoss):
    """Contrastive Preference Optimization (Xu et al., 2024, Eq. 3 and 6): DPO without the
    reference (its limit as the reference becomes uniform) plus NLL on the chosen responses:

        loss = -(1 - eps) log sigmoid(beta (pi_w - pi_l)) - eps log sigmoid(-beta (pi_w - pi_l))
               + nll_weight * NLL

    **Summed** log-probs; no reference; rewards beta * pi. Equals TRL's CPOTrainer with
    loss_type="sigmoid" (`cpo_alpha` = nll_weight). The paper uses beta = 0.1 and NLL weight 1.

    Keys:
        beta: reward scale; > 0 (paper: 0.1).
        label_smoothing: assumed flip rate, in [0, 0.5).
        nll_weight: weight of the chosen responses' token-mean NLL (TRL: cpo_alpha), >= 0
            (paper: 1.0).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, nll_weight: float = 1.0):
        problems: list[str] = []
        check_beta(problems, beta)
        check_smoothing(problems, label_smoothing)
        _check_weight(problems, "nll_weight", nll_weight)
        raise_problems(problems)
        self.beta, self.label_smoothing, self.nll_weight = float(beta), float(label_smoothing), float(nll_weight)

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        pw, pl = policy["chosen"].logps, policy["rejected"].logps
        losses = smoothed_sigmoid(self.beta * (pw - pl), self.label_smoothing)
        nll = chosen_nll(policy)
        losses = losses + self.nll_weight * nll
        return output(losses, self.beta * pw, self.beta * pl, nll_loss=nll.mean())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, switching formulas at -log 2 to avoid cancellation."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOLoss(ReferenceFreeLoss):
    """Odds Ratio Preference Optimization (Hong et al., 2024, Eq. 4 to 7): SFT plus a penalty
    on the log odds ratio, no reference and no separate SFT stage:

        odds(y) = p / (1 - p),  p = exp(a)        (a: per-token mean log-prob of the response)
        log_odds = (a_w - a_l) - (log(1 - exp(a_w)) - log(1 - exp(a_l)))
        loss = NLL - beta log sigmoid(log_odds)

    Per-token **mean** log-probs; no reference; rewards beta * a. The NLL is the token mean
    over the chosen sequences' prompt *and* response tokens (every token but the first) by
    default, as in the ORPO authors' code and TRL; `prompt_nll=false` takes it over response
    tokens only (the authors' --disable_prompt_loss). Equals TRL's ORPOTrainer (beta = the
    paper's lambda; the paper uses 0.1). Logs `nll_loss`, `log_odds_ratio` (mean log
    sigmoid(log_odds)) and `log_odds_chosen` (mean log_odds), as TRL does.

    Keys:
        beta: weight of the odds-ratio term (the paper's lambda); > 0 (paper: 0.1).
        prompt_nll: NLL over prompt and response tokens (ORPO code, TRL); false = response
            tokens only.
    """

    def __init__(self, beta: float = 0.1, prompt_nll: bool = True):
        problems: list[str] = []
        check_beta(problems, beta, typical="0.1 to 1.0")
        raise_problems(problems)
        self.beta = float(beta)
        self.prompt_nll = bool(prompt_nll)
        self.needs = frozenset({WHOLE}) if prompt_nll else frozenset()

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        aw, al = policy_means(policy)
        log_odds = (aw - al) - (log1mexp(aw) - log1mexp(al))
        ratio = F.logsigmoid(log_odds)
        nll = chosen_whole_nll(policy) if self.prompt_nll else chosen_nll(policy)
        return output(
            nll - self.beta * ratio,
            self.beta * aw,
            self.beta * al,
            (aw, al),
            nll_loss=nll.mean(),
            log_odds_ratio=ratio.mean(),
            log_odds_chosen=log_odds.mean(),
        )


class SimPERLoss(ReferenceFreeLoss):
    """SimPER (Xiao et al., 2025, Eq. 6): no hyperparameters and no reference; raises the
    inverse perplexity of chosen responses and lowers that of rejected ones:

        loss = -exp(a_w) + exp(a_l)

    Per-token **mean** log-probs (exp(a) is the inverse perplexity). Rewards are a_w and a_l
    (log inverse perplexities), so `rewards/accuracies` says how often the chosen response
    is the less perplexing one. TRL has no SimPER; checked against hand-worked numbers.
    """

    def __init__(self) -> None:
        pass

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        aw, al = policy_means(policy)
        return output(-torch.exp(aw) + torch.exp(al), aw, al)


class SFTLoss(ReferenceFreeLoss):
    """Supervised fine-tuning on the chosen responses: the batch's token-mean NLL,

        loss = -sum_i pi_w,i / sum_i |y_w,i|

    (the SFT stage that precedes DPO in the DPO paper, or a term of a combination such as
    RPO). No reference; rejected responses are not trained on. Rewards are the per-token
    mean log-probs a_w and a_l. Equals TRL's `sft` loss type. Works on unpaired data too,
    where it trains on the desirable completions.
    """

    paired = False

    def __init__(self) -> None:
        pass

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        return output(chosen_nll(policy), *policy_means(policy))
