"""Reference-based losses on preference pairs: DPO and its relatives.

Notation (per pair i; every tensor below is (B,)):
    pi_w, pi_l    policy log-probs of the chosen (w) and rejected (l) response, **summed** over
                  response tokens (prompt and padding excluded)
    ref_w, ref_l  the same under the reference model
    h_w = pi_w - ref_w, h_l = pi_l - ref_l      the log-ratios
    |y_w|, |y_l|  response lengths in tokens

Unless a loss says otherwise: the loss is the mean over pairs of the per-pair loss, and the
rewards are beta * h_w and beta * h_l (detached), as in TRL's DPOTrainer.

Every loss here accepts the LD-DPO (`ld_alpha`) and WPO (`wpo`) modifiers (`modifiers`; AOT
not WPO); those that TRL 1.16 lists as built on the reward difference (`FDivergenceLoss`) also
the f-divergence (`f_divergence`, `f_alpha`), which replaces h by s(h) in their score difference.
Every loss here takes `beta` (> 0; its meaning is each loss's own, its docstring says).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from dpo_cli.logprobs import SequenceLogps
from dpo_cli.losses.base import (
    Loss,
    LossOutput,
    Reduce,
    check_beta,
    check_smoothing,
    chosen_nll,
    local,
    mean_logps,
    output,
    raise_problems,
    smoothed_sigmoid,
)
from dpo_cli.losses.modifiers import FDivergence, LengthDesensitized, PairWeights


@dataclass
class Ratios:
    """A batch of pairs as the paired losses read it (all (B,), log-probs after the input
    modifiers; `chosen` and `rejected` after the margin modifiers: s(h))."""

    chosen: torch.Tensor  # h_w = pi_w - ref_w
    rejected: torch.Tensor  # h_l = pi_l - ref_l
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def delta(self) -> torch.Tensor:
        """s(h_w) - s(h_l): h_w - h_l under reverse KL (DPO)."""
        return self.chosen - self.rejected

    def mean_delta(self) -> torch.Tensor:
        """s(h_w) / |y_w| - s(h_l) / |y_l|: the score difference per response token."""
        return mean_logps(self.chosen, self.chosen_tokens) - mean_logps(self.rejected, self.rejected_tokens)


def ratios(policy: SequenceLogps, reference: SequenceLogps) -> Ratios:
    """The log-ratios h = pi - ref of each pair, with the log-probs and lengths they come from."""
    pw, pl = policy["chosen"].logps, policy["rejected"].logps
    rw, rl = reference["chosen"].logps, reference["rejected"].logps
    return Ratios(pw - rw, pl - rl, pw, pl, rw, rl, policy["chosen"].tokens, policy["rejected"].tokens)


class PairedLoss(Loss):
    """Base of the reference-based paired losses: log-ratios, modifiers and rewards.

        values -> inputs modifiers (LD-DPO) -> h -> rewards beta * h
               -> margin modifiers (h -> s(h)) -> pair_losses (B,) -> outputs modifiers (WPO) -> mean

    Subclasses implement `pair_losses(r) -> (B,)` and set their own keys with `setup`.

    Keys:
        beta: reward scale, > 0 (typical 0.01 to 0.5; paper: 0.1).
    """

    accepts = (LengthDesensitized, PairWeights)

    def __init__(self, beta: float = 0.1, **modifiers: Any):
        self.setup([], beta, modifiers)

    def setup(self, problems: list[str], beta: float, modifiers: dict[str, Any]) -> None:
        """Check beta and the subclass's `problems`, build the modifiers; raise once for all."""
        check_beta(problems, beta)
        self.modify(problems, modifiers)
        raise_problems(problems)
        self.beta = float(beta)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        assert reference is not None, f"{type(self).__name__} requires reference log-probs"
        modified, modified_reference = policy, reference
        for m in self.modifiers:
            modified, modified_reference = m.inputs(modified), m.inputs(modified_reference)
        r = ratios(modified, modified_reference)
        rewards = (self.beta * r.chosen, self.beta * r.rejected)
        for m in self.modifiers:
            r = replace(r, chosen=m.margin(r.chosen), rejected=m.margin(r.rejected))
        losses = self.pair_losses(r)
        for m in self.modifiers:
            losses = m.outputs(losses, policy)
        # With input modifiers on (ld_alpha), logps/* are the modified log-probs, as TRL logs them.
        logps = None if modified is policy else (r.policy_chosen, r.policy_rejected)
        return output(losses, *rewards, logps)


class FDivergenceLoss(PairedLoss):
    """A paired loss built on the score difference s(h_w) - s(h_l) (`Ratios.delta`), so that
    it also accepts the f-divergence modifier (`modifiers.FDivergence`)."""

    accepts = (LengthDesensitized, PairWeights, FDivergence)


class DPOLoss(FDivergenceLoss):
    """Direct Preference Optimization, sigmoid form (Rafailov et al., 2023, Eq. 7).

        loss = -(1 - eps) log sigmoid(beta (h_w - h_l)) - eps log sigmoid(-beta (h_w - h_l))

    Summed log-probs; needs a reference. `label_smoothing` = eps > 0 is conservative DPO
    (cDPO; Mitchell, 2023): it assumes a fraction eps of the labels are flipped; eps = 0 is
    plain DPO and equals TRL's `sigmoid` (TRL 1.16 no longer smooths `sigmoid`). The paper
    uses beta = 0.1 (0.5 for TL;DR summarization). `nll_weight` > 0 adds that multiple of the
    token-mean NLL of the chosen responses (RPO, Pang et al., 2024; TRL's `rpo_alpha`), logged
    as `nll_loss`; the NLL is not weighted by WPO.

    Keys (and the modifiers' `ld_alpha`, `wpo`, `f_divergence`, `f_alpha`):
        beta: KL strength: higher keeps the policy closer to the reference; > 0 (typical 0.01
            to 0.5; paper: 0.1).
        label_smoothing: assumed fraction of flipped labels, in [0, 0.5); > 0 is cDPO.
        nll_weight: >= 0; > 0 adds this multiple of the chosen responses' token-mean NLL
            (RPO: loss=rpo sets 1.0; TRL's rpo_alpha).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, nll_weight: float = 0.0, **modifiers: Any):
        problems: list[str] = []
        check_smoothing(problems, label_smoothing)
        if not nll_weight >= 0:
            problems.append(f"nll_weight={nll_weight} must be >= 0 (0 = plain DPO; RPO uses 1.0)")
        self.setup(problems, beta, modifiers)
        self.label_smoothing, self.nll_weight = float(label_smoothing), float(nll_weight)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return smoothed_sigmoid(self.beta * r.delta(), self.label_smoothing)

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        out = super().__call__(policy, reference, reduce)
        if self.nll_weight == 0:
            return out
        nll = chosen_nll(policy)
        assert out.losses is not None
        logps = None if out.chosen_logps is None else (out.chosen_logps, out.rejected_logps)
        losses = out.losses + self.nll_weight * nll
        return output(losses, out.chosen_rewards, out.rejected_rewards, logps, **out.metrics, nll_loss=nll.mean())


class RobustDPOLoss(FDivergenceLoss):
    """Robust DPO, rDPO (Chowdhury et al., 2024, Eq. 8): an unbiased loss under label noise.

        L(x) = -log sigmoid(x),  x = beta (h_w - h_l)
        loss = ((1 - eps) L(x) - eps L(-x)) / (1 - 2 eps)

    eps = `label_smoothing`, the assumed flip rate, in [0, 0.5); eps = 0 is DPO. Summed
    log-probs; needs a reference; equals TRL's `robust`. The paper's default eps is 0.1.

    Keys (and `ld_alpha`, `wpo`, `f_divergence`, `f_alpha`):
        beta: KL strength; > 0.
        label_smoothing: assumed label-flip rate, in [0, 0.5); 0 = DPO (paper default 0.1).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1, **modifiers: Any):
        problems: list[str] = []
        check_smoothing(problems, label_smoothing)
        self.setup(problems, beta, modifiers)
        self.label_smoothing = float(label_smoothing)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        x, eps = self.beta * r.delta(), self.label_smoothing
        return ((1 - eps) * -F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


class HingeLoss(FDivergenceLoss):
    """SLiC-HF's calibration loss (Zhao et al., 2023, Eq. 1), with the reference's log-ratio:

        loss = max(0, 1 - beta (h_w - h_l))

    i.e. a margin of 1/beta on the log-ratio difference (it replaces SLiC's delta). Summed
    log-probs; needs a reference; equals TRL's `hinge`.

    Keys (and `ld_alpha`, `wpo`, `f_divergence`, `f_alpha`):
        beta: inverse margin: the log-ratio gap is pushed to >= 1/beta; > 0.
    """

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return torch.relu(1 - self.beta * r.delta())


class IPOLoss(FDivergenceLoss):
    """Identity Preference Optimization (Azar et al., 2023, Eq. 17), length-normalised:

        loss = (h_w / |y_w| - h_l / |y_l| - 1 / (2 tau))^2,   tau = beta

    The log-ratios are **averaged** over response tokens, as the IPO authors specify (TRL
    confirmed this with them; the paper's results use this form). Needs a reference; equals
    TRL's `ipo`. Larger beta = weaker regularisation target 1/(2 beta).

    Keys (and `ld_alpha`, `wpo`, `f_divergence`, `f_alpha`):
        beta: the paper's tau: the target gap is 1/(2 beta) per token; > 0.
    """

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return (r.mean_delta() - 1 / (2 * self.beta)) ** 2


class SigmoidNormLoss(FDivergenceLoss):
    """Length-normalised DPO:

        loss = -log sigmoid(beta (h_w / |y_w| - h_l / |y_l|))

    Log-ratios **averaged** over response tokens, so long responses do not dominate; needs a
    reference; equals TRL's `sigmoid_norm`. Averaging shrinks the margin by ~1/length, so beta
    is typically larger than DPO's.

    Keys (and `ld_alpha`, `wpo`, `f_divergence`, `f_alpha`):
        beta: KL strength on per-token log-ratios; > 0 (usually larger than DPO's).
    """

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return -F.logsigmoid(self.beta * r.mean_delta())


class EXOPairLoss(FDivergenceLoss):
    """EXO, pairwise preference form (Ji et al., 2024, Eq. 16): the reverse KL from the
    policy's pair distribution q = softmax(beta h) to the smoothed labels p = (1 - eps, eps):

        x = beta (h_w - h_l)
        loss = sigmoid(x) (log sigmoid(x) - log(1 - eps)) + sigmoid(-x) (log sigmoid(-x) - log eps)

    Summed log-probs; needs a reference; equals TRL's `exo_pair` (where eps is called
    label_smoothing). eps must be in (0, 1); the paper uses 1e-3.

    Keys (and `ld_alpha`, `wpo`, `f_divergence`, `f_alpha`):
        beta: KL strength; > 0.
        epsilon: label smoothing of the target distribution, in (0, 1) (paper: 1e-3).
    """

    def __init__(self, beta: float = 0.1, epsilon: float = 1e-3, **modifiers: Any):
        problems: list[str] = []
        if not 0 < epsilon < 1:
            problems.append(f"epsilon={epsilon} must be in (0, 1): EXO takes log(epsilon) (the paper uses 1e-3)")
        self.setup(problems, beta, modifiers)
        self.epsilon = float(epsilon)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        x = self.beta * r.delta()
        return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-self.epsilon)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(self.epsilon)
        )


class DiscoPOPLoss(FDivergenceLoss):
    """DiscoPOP, the log-ratio modulated loss found by LLM-driven search (Chris Lu et al.,
    2024, Eq. 5): a blend of the logistic and the exponential loss, weighted by how far the
    pair's margin already is:

        x = beta (h_w - h_l),  m = sigmoid(x / tau)
        loss = (1 - m) (-log sigmoid(x)) + m exp(-x)

    Summed log-probs; needs a reference; equals TRL's `discopop`. The paper recommends
    tau = 0.05.

    Keys (and `ld_alpha`, `wpo`, `f_divergence`, `f_alpha`):
        beta: KL strength; > 0.
        tau: temperature of the modulation, > 0 (paper: 0.05).
    """

    def __init__(self, beta: float = 0.1, tau: float = 0.05, **modifiers: Any):
        problems: list[str] = []
        if not tau > 0:
            problems.append(f"tau={tau} must be > 0 (the paper recommends 0.05)")
        self.setup(problems, beta, modifiers)
        self.tau = float(tau)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        x = self.beta * r.delta()
        m = torch.sigmoid(x / self.tau)
        return (1 - m) * -F.logsigmoid(x) + m * torch.exp(-x)


class NCAPairLoss(PairedLoss):
    """Noise Contrastive Alignment, pairwise form (Chen et al., 2024, Eq. 11): absolute
    likelihoods, so that the chosen response's likelihood is kept up:

        loss = -log sigmoid(beta h_w) - 1/2 log sigmoid(-beta h_w) - 1/2 log sigmoid(-beta h_l)

    Summed log-probs; needs a reference; equals TRL's `nca_pair`.

    Keys (and `ld_alpha`, `wpo`):
        beta: reward scale; > 0.
    """

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        w, lo = self.beta * r.chosen, self.beta * r.rejected
        return -F.logsigmoid(w) - 0.5 * F.logsigmoid(-w) - 0.5 * F.logsigmoid(-lo)


class BCOPairLoss(PairedLoss):
    """Binary Classifier Optimization on pairs (Jung et al., 2024, Eq. 6), as TRL 1.16 computes
    it: chosen rewards classified as positive, rejected ones as negative,

        loss = -log sigmoid(beta h_w) - log sigmoid(-beta h_l)

    Summed log-probs; needs a reference; equals TRL's `bco_pair`. Deliberate difference from
    the paper: no reward shift delta (the paper's running mean of rewards); TRL dropped it too.

    Keys (and `ld_alpha`, `wpo`):
        beta: reward scale; > 0.
    """

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return -F.logsigmoid(self.beta * r.chosen) - F.logsigmoid(-self.beta * r.rejected)


class SPPOHardLoss(PairedLoss):
    """Self-Play Preference Optimization (Wu et al., 2024, Eq. 4.7) with hard labels (winner
    probability 1, loser 0), as TRL's `sppo_hard` (equal to it):

        loss = (h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2

    Summed log-probs; needs a reference. The paper's soft version needs win probabilities
    from a preference model, which pairs do not carry.

    Keys (and `ld_alpha`, `wpo`):
        beta: the target log-ratios are +-1/(2 beta); > 0.
    """

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return (r.chosen - 0.5 / self.beta) ** 2 + (r.rejected + 0.5 / self.beta) ** 2


class AOTLoss(PairedLoss):
    """Alignment via Optimal Transport, paired (Melnyk et al., 2024, Eq. 9): distributional
    dominance of the policy's log-ratio margins over the reference's, via sorting in the batch:

        m = sort_batch(pi_w - pi_l),  m_ref = sort_batch(ref_w - ref_l),  x = beta (m - m_ref)
        loss = -(1 - eps) log sigmoid(x) - eps log sigmoid(-x)

    Summed log-probs; needs a reference; the sort runs over the micro batch (a batch-level
    loss: larger micro batches estimate the distributions better); equals TRL's `aot`.
    Accepts LD-DPO only: not WPO (pairs lose their identity when sorted).

    Keys (and `ld_alpha`):
        beta: KL strength; > 0.
        label_smoothing: assumed flip rate, in [0, 0.5).
    """

    accepts = (LengthDesensitized,)

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, **modifiers: Any):
        problems: list[str] = []
        check_smoothing(problems, label_smoothing)
        self.setup(problems, beta, modifiers)
        self.label_smoothing = float(label_smoothing)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        m = torch.sort(r.policy_chosen - r.policy_rejected, dim=0).values
        m_ref = torch.sort(r.ref_chosen - r.ref_rejected, dim=0).values
        return smoothed_sigmoid(self.beta * (m - m_ref), self.label_smoothing)


class AOTUnpairedLoss(AOTLoss):
    """AOT, unpaired form (Melnyk et al., 2024, Eq. 8): dominance of the chosen log-ratios'
    distribution over the rejected ones', via sorting each in the batch:

        x = beta (sort_batch(h_w) - sort_batch(h_l))
        loss = -(1 - eps) log sigmoid(x) - eps log sigmoid(-x)

    Summed log-probs; needs a reference; equals TRL's `aot_unpaired`.

    Keys (and `ld_alpha`):
        beta: KL strength; > 0.
        label_smoothing: assumed flip rate, in [0, 0.5).
    """

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        x = torch.sort(r.chosen, dim=0).values - torch.sort(r.rejected, dim=0).values
        return smoothed_sigmoid(self.beta * x, self.label_smoothing)


class APOZeroLoss(PairedLoss):
    """Anchored Preference Optimization, APO-zero (D'Oosterlinck et al., 2024, Eq. 7): for
    chosen responses better than the model's own outputs; pushes chosen up, rejected down:

        loss = (1 - sigmoid(beta h_w)) + sigmoid(beta h_l)

    Summed log-probs; needs a reference; equals TRL's `apo_zero`. The paper uses beta = 0.1.

    Keys (and `ld_alpha`, `wpo`):
        beta: reward scale; > 0 (paper: 0.1).
    """

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return (1 - torch.sigmoid(self.beta * r.chosen)) + torch.sigmoid(self.beta * r.rejected)


class APODownLoss(PairedLoss):
    """APO-down (D'Oosterlinck et al., 2024, Eq. 8): for chosen responses worse than the
    model's own outputs; pushes both down, the rejected one more:

        loss = sigmoid(beta h_w) + (1 - sigmoid(beta (h_w - h_l)))

    Summed log-probs; needs a reference; equals TRL's `apo_down`.

    Keys (and `ld_alpha`, `wpo`):
        beta: reward scale; > 0 (paper: 0.1).
    """

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return torch.sigmoid(self.beta * r.chosen) + (1 - torch.sigmoid(self.beta * (r.chosen - r.rejected)))


class DPOPLoss(PairedLoss):
    """DPO-Positive, DPOP (Pal et al., 2024, "Smaug", Eq. 3): DPO that also penalises the
    chosen log-ratio falling below zero, which plain DPO allows while it widens the margin:

        loss = -log sigmoid(beta (h_w - h_l - lambda max(0, -h_w)))

    max(0, -h_w) = max(0, log ref(y_w|x) / pi(y_w|x)). The penalty sits **inside** the sigmoid,
    scaled by beta, as in the paper's Eq. 3 (some implementations add it outside the log-sigmoid
    instead). Summed log-probs; needs a reference. The paper sets lambda = 50. TRL has no
    DPOP; checked against hand-worked numbers.

    Keys (and `ld_alpha`, `wpo`):
        beta: KL strength; > 0.
        dpop_lambda: penalty weight on max(0, log ref(y_w)/pi(y_w)), >= 0; 0 = DPO (paper: 50).
    """

    def __init__(self, beta: float = 0.1, dpop_lambda: float = 50.0, **modifiers: Any):
        problems: list[str] = []
        if not dpop_lambda >= 0:
            problems.append(f"dpop_lambda={dpop_lambda} must be >= 0 (0 = plain DPO; the paper uses 50)")
        self.setup(problems, beta, modifiers)
        self.dpop_lambda = float(dpop_lambda)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        penalty = self.dpop_lambda * torch.relu(-r.chosen)
        return -F.logsigmoid(self.beta * (r.chosen - r.rejected - penalty))


class RDPOLoss(PairedLoss):
    """Length-regularised DPO, R-DPO (Park et al., 2024, "Disentangling Length from Quality",
    Eq. 9): the reward is beta h + alpha |y|, so a length difference explains part of the
    preference and the policy gains less from simply getting longer:

        loss = -log sigmoid(beta (h_w - h_l) + alpha (|y_w| - |y_l|))

    Summed log-probs, lengths in response tokens; needs a reference; alpha = 0 is DPO. The
    paper tunes alpha per dataset on a small grid (around 0.01 at beta = 0.1). TRL has no
    R-DPO; checked against hand-worked numbers.

    Keys (and `ld_alpha`, `wpo`):
        beta: KL strength; > 0.
        alpha: length regulariser per response token, >= 0; 0 = DPO.
    """

    def __init__(self, beta: float = 0.1, alpha: float = 0.01, **modifiers: Any):
        problems: list[str] = []
        if not alpha >= 0:
            problems.append(f"alpha={alpha} must be >= 0 (0 = plain DPO)")
        self.setup(problems, beta, modifiers)
        self.alpha = float(alpha)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        length = self.alpha * (r.chosen_tokens - r.rejected_tokens)
        return -F.logsigmoid(self.beta * (r.chosen - r.rejected) + length)


class CalDPOLoss(PairedLoss):
    """Calibrated DPO, Cal-DPO (Xiao et al., 2024, Eq. 10): the Bradley-Terry loss on the
    unscaled log-ratios plus a calibration term that pins their scale to +-1/(2 beta):

        loss = -log sigmoid(h_w - h_l) + (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2

    Summed log-probs; needs a reference. This is the paper's Eq. 10 (the authors confirmed
    it in their repository's issues); their released training code weights the calibration
    term by 1/2 instead. Rewards are beta * h as for the other losses. The authors' released
    config uses beta = 0.002 (calibration targets +-250). TRL has no Cal-DPO; checked against
    hand-worked numbers.

    Keys (and `ld_alpha`, `wpo`):
        beta: sets the calibration targets +-1/(2 beta); > 0 (authors' config: 0.002).
    """

    def __init__(self, beta: float = 0.002, **modifiers: Any):
        self.setup([], beta, modifiers)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        target = 1 / (2 * self.beta)
        return -F.logsigmoid(r.chosen - r.rejected) + (r.chosen - target) ** 2 + (r.rejected + target) ** 2
