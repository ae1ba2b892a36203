"""Reference-based losses on preference pairs: DPO and its relatives.

Notation (per pair i; every tensor below is (B,)):
    pi_w, pi_l    policy log-probs of the chosen (w) and rejected (l) response, **summed** over
                  response tokens (prompt and padding excluded)
    ref_w, ref_l  the same under the reference model
    h_w = pi_w - ref_w, h_l = pi_l - ref_l      the log-ratios
    |y_w|, |y_l|  response lengths in tokens

Unless a loss says otherwise: the loss is the mean over pairs of the per-pair loss, and the
rewards are beta * h_w and beta * h_l (detached), as in TRL's DPOTrainer.

Modifiers every loss here accepts:
    ld_alpha (LD-DPO; Liu et al., 2024, Eq. 8): the log-probs of policy and reference become
        pi = pi[first min(|y_w|, |y_l|) tokens] + ld_alpha * pi[remaining tokens], so the
        longer response's surplus tokens count ld_alpha-fold; None = off (equal to 1.0).
    wpo (WPO; Zhou et al., 2024, Eq. 2): each pair's loss is multiplied by the detached weight
        exp(mean_t [log p(y_w,t) - log sum_v p(v)^2]) * (the same for y_l), under the policy.
The losses that TRL 1.16 lists as built on the reward difference also take an f-divergence
(`f_divergence`; Wang et al., 2023, "Beyond Reverse KL"): h is replaced by f'(exp(h)) before the
difference: reverse_kl h (DPO), forward_kl 1 - exp(-h), js_divergence log 2 + log sigmoid(h),
alpha_divergence (exp((alpha - 1) h) - 1) / (alpha - 1). `f_alpha` follows TRL's
`f_alpha_divergence_coef` convention (its code): f_alpha = 1 gives reverse KL and 0 forward KL,
so it is 1 minus the paper's alpha (whose f'(u) = (1 - u^-alpha) / alpha); the two agree at the
default 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo_cli.logprobs import SHARED, WPO, SequenceLogps
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

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass
class Ratios:
    """A batch of pairs as the paired losses read it (all (B,), log-probs after ld_alpha)."""

    chosen: torch.Tensor  # h_w = pi_w - ref_w
    rejected: torch.Tensor  # h_l = pi_l - ref_l
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


class PairedLoss(Loss):
    """Base of the reference-based paired losses: log-ratios, LD-DPO, WPO and rewards.
    Subclasses implement `pair_losses(r) -> (B,)`."""

    def __init__(
        self, beta: float, ld_alpha: float | None = None, wpo: bool = False, problems: list[str] | None = None
    ):
        problems = problems if problems is not None else []
        check_beta(problems, beta)
        if ld_alpha is not None and not 0 <= ld_alpha <= 1:
            problems.append(f"ld_alpha={ld_alpha} must be in [0, 1] (1 = plain DPO, 0 = only the shared length counts)")
        raise_problems(problems)
        self.beta = float(beta)
        self.ld_alpha = None if ld_alpha is None else float(ld_alpha)
        self.wpo = bool(wpo)
        self.needs = frozenset(({SHARED} if ld_alpha is not None else set()) | ({WPO} if wpo else set()))

    def _logps(self, s: SequenceLogps) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ld_alpha is None:
            return s.chosen, s.rejected
        assert s.chosen_shared is not None and s.rejected_shared is not None, "ld_alpha needs shared log-probs"
        a = self.ld_alpha
        return (
            s.chosen_shared + a * (s.chosen - s.chosen_shared),
            s.rejected_shared + a * (s.rejected - s.rejected_shared),
        )

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        assert reference is not None, f"{type(self).__name__} requires reference log-probs"
        pw, pl = self._logps(policy)
        rw, rl = self._logps(reference)
        r = Ratios(pw - rw, pl - rl, pw, pl, rw, rl, policy.chosen_tokens, policy.rejected_tokens)
        losses = self.pair_losses(r)
        if self.wpo:
            assert policy.chosen_wpo is not None and policy.rejected_wpo is not None
            losses = losses * torch.exp(policy.chosen_wpo) * torch.exp(policy.rejected_wpo)
        # With ld_alpha, logps/* are the LD-weighted log-probs, as TRL logs them.
        logps = (pw, pl) if self.ld_alpha is not None else None
        return output(losses, self.beta * r.chosen, self.beta * r.rejected, logps)


class FDivergenceLoss(PairedLoss):
    """A paired loss built on the score difference s(h_w) - s(h_l), with s = f' of the chosen
    f-divergence (module docstring); reverse_kl gives s(h) = h."""

    def __init__(
        self,
        beta: float,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        ld_alpha: float | None = None,
        wpo: bool = False,
        problems: list[str] | None = None,
    ):
        problems = problems if problems is not None else []
        if f_divergence not in F_DIVERGENCES:
            problems.append(f"f_divergence={f_divergence!r} is not one of {', '.join(F_DIVERGENCES)}")
        super().__init__(beta, ld_alpha, wpo, problems)
        self.f_divergence = f_divergence
        self.f_alpha = float(f_alpha)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        if self.f_divergence == "forward_kl":
            return 1 - torch.exp(-h)
        if self.f_divergence == "js_divergence":
            return math.log(2) + F.logsigmoid(h)
        if self.f_divergence == "alpha_divergence" and abs(self.f_alpha - 1) > 1e-6:
            # Clamped as TRL does, so that exp stays finite in float32.
            t = torch.clamp((self.f_alpha - 1) * h, max=80.0)
            return (torch.exp(t) - 1) / (self.f_alpha - 1)
        return h  # reverse_kl, and alpha_divergence's limit at alpha = 1

    def delta(self, r: Ratios) -> torch.Tensor:
        """s(h_w) - s(h_l): h_w - h_l for reverse KL (DPO)."""
        return self.score(r.chosen) - self.score(r.rejected)

    def mean_delta(self, r: Ratios) -> torch.Tensor:
        """s(h_w) / |y_w| - s(h_l) / |y_l|: the score difference per response token."""
        return mean_logps(self.score(r.chosen), r.chosen_tokens) - mean_logps(self.score(r.rejected), r.rejected_tokens)


class DPOLoss(FDivergenceLoss):
    """Direct Preference Optimization, sigmoid form (Rafailov et al., 2023, Eq. 7).

        loss = -(1 - eps) log sigmoid(beta (h_w - h_l)) - eps log sigmoid(-beta (h_w - h_l))

    Summed log-probs; needs a reference. `label_smoothing` = eps > 0 is conservative DPO
    (cDPO; Mitchell, 2023): it assumes a fraction eps of the labels are flipped; eps = 0 is
    plain DPO and equals TRL's `sigmoid` (TRL 1.16 no longer smooths `sigmoid`). The paper
    uses beta = 0.1 (0.5 for TL;DR summarization). `nll_weight` > 0 adds that multiple of the
    token-mean NLL of the chosen responses (RPO, Pang et al., 2024; TRL's `rpo_alpha`), logged
    as `nll_loss`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        ld_alpha: float | None = None,
        wpo: bool = False,
        nll_weight: float = 0.0,
    ):
        problems: list[str] = []
        check_smoothing(problems, label_smoothing)
        if not nll_weight >= 0:
            problems.append(f"nll_weight={nll_weight} must be >= 0 (0 = plain DPO; RPO uses 1.0)")
        super().__init__(beta, f_divergence, f_alpha, ld_alpha, wpo, problems)
        self.label_smoothing, self.nll_weight = float(label_smoothing), float(nll_weight)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return smoothed_sigmoid(self.beta * self.delta(r), self.label_smoothing)

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
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        ld_alpha: float | None = None,
        wpo: bool = False,
    ):
        problems: list[str] = []
        check_smoothing(problems, label_smoothing)
        super().__init__(beta, f_divergence, f_alpha, ld_alpha, wpo, problems)
        self.label_smoothing = float(label_smoothing)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        x, eps = self.beta * self.delta(r), self.label_smoothing
        return ((1 - eps) * -F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


class HingeLoss(FDivergenceLoss):
    """SLiC-HF's calibration loss (Zhao et al., 2023, Eq. 1), with the reference's log-ratio:

        loss = max(0, 1 - beta (h_w - h_l))

    i.e. a margin of 1/beta on the log-ratio difference. Summed log-probs; needs a reference;
    equals TRL's `hinge`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        ld_alpha: float | None = None,
        wpo: bool = False,
    ):
        super().__init__(beta, f_divergence, f_alpha, ld_alpha, wpo)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return torch.relu(1 - self.beta * self.delta(r))


class IPOLoss(FDivergenceLoss):
    """Identity Preference Optimization (Azar et al., 2023, Eq. 17), length-normalised:

        loss = (h_w / |y_w| - h_l / |y_l| - 1 / (2 tau))^2,   tau = beta

    The log-ratios are **averaged** over response tokens, as the IPO authors specify (TRL
    confirmed this with them; the paper's results use this form). Needs a reference; equals
    TRL's `ipo`. Larger beta = weaker regularisation target 1/(2 beta).
    """

    def __init__(
        self,
        beta: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        ld_alpha: float | None = None,
        wpo: bool = False,
    ):
        super().__init__(beta, f_divergence, f_alpha, ld_alpha, wpo)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return (self.mean_delta(r) - 1 / (2 * self.beta)) ** 2


class SigmoidNormLoss(FDivergenceLoss):
    """Length-normalised DPO:

        loss = -log sigmoid(beta (h_w / |y_w| - h_l / |y_l|))

    Log-ratios **averaged** over response tokens, so long responses do not dominate; needs a
    reference; equals TRL's `sigmoid_norm`. Averaging shrinks the margin by ~1/length, so beta
    is typically larger than DPO's.
    """

    def __init__(
        self,
        beta: float = 0.1,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        ld_alpha: float | None = None,
        wpo: bool = False,
    ):
        super().__init__(beta, f_divergence, f_alpha, ld_alpha, wpo)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return -F.logsigmoid(self.beta * self.mean_delta(r))


class EXOPairLoss(FDivergenceLoss):
    """EXO, pairwise preference form (Ji et al., 2024, Eq. 16): the reverse KL from the
    policy's pair distribution q = softmax(beta h) to the smoothed labels p = (1 - eps, eps):

        x = beta (h_w - h_l)
        loss = sigmoid(x) (log sigmoid(x) - log(1 - eps)) + sigmoid(-x) (log sigmoid(-x) - log eps)

    Summed log-probs; needs a reference; equals TRL's `exo_pair` (where eps is called
    label_smoothing). eps must be in (0, 1); the paper uses 1e-3.
    """

    def __init__(
        self,
        beta: float = 0.1,
        epsilon: float = 1e-3,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        ld_alpha: float | None = None,
        wpo: bool = False,
    ):
        problems: list[str] = []
        if not 0 < epsilon < 1:
            problems.append(f"epsilon={epsilon} must be in (0, 1): EXO takes log(epsilon) (the paper uses 1e-3)")
        super().__init__(beta, f_divergence, f_alpha, ld_alpha, wpo, problems)
        self.epsilon = float(epsilon)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        x = self.beta * self.delta(r)
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
    """

    def __init__(
        self,
        beta: float = 0.1,
        tau: float = 0.05,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        ld_alpha: float | None = None,
        wpo: bool = False,
    ):
        problems: list[str] = []
        if not tau > 0:
            problems.append(f"tau={tau} must be > 0 (the paper recommends 0.05)")
        super().__init__(beta, f_divergence, f_alpha, ld_alpha, wpo, problems)
        self.tau = float(tau)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        x = self.beta * self.delta(r)
        m = torch.sigmoid(x / self.tau)
        return (1 - m) * -F.logsigmoid(x) + m * torch.exp(-x)


class NCAPairLoss(PairedLoss):
    """Noise Contrastive Alignment, pairwise form (Chen et al., 2024, Eq. 11): absolute
    likelihoods, so that the chosen response's likelihood is kept up:

        loss = -log sigmoid(beta h_w) - 1/2 log sigmoid(-beta h_w) - 1/2 log sigmoid(-beta h_l)

    Summed log-probs; needs a reference; equals TRL's `nca_pair`.
    """

    def __init__(self, beta: float = 0.1, ld_alpha: float | None = None, wpo: bool = False):
        super().__init__(beta, ld_alpha, wpo)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        w, lo = self.beta * r.chosen, self.beta * r.rejected
        return -F.logsigmoid(w) - 0.5 * F.logsigmoid(-w) - 0.5 * F.logsigmoid(-lo)


class BCOPairLoss(PairedLoss):
    """Binary Classifier Optimization on pairs (Jung et al., 2024, Eq. 6), as TRL 1.16 computes
    it: chosen rewards classified as positive, rejected ones as negative,

        loss = -log sigmoid(beta h_w) - log sigmoid(-beta h_l)

    Summed log-probs; needs a reference; equals TRL's `bco_pair`. Deliberate difference from
    the paper: no reward shift delta (the paper's running mean of rewards); TRL dropped it too.
    """

    def __init__(self, beta: float = 0.1, ld_alpha: float | None = None, wpo: bool = False):
        super().__init__(beta, ld_alpha, wpo)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return -F.logsigmoid(self.beta * r.chosen) - F.logsigmoid(-self.beta * r.rejected)


class SPPOHardLoss(PairedLoss):
    """Self-Play Preference Optimization (Wu et al., 2024, Eq. 4.7) with hard labels (winner
    probability 1, loser 0), as TRL's `sppo_hard` (equal to it):

        loss = (h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2

    Summed log-probs; needs a reference. The paper's soft version needs win probabilities
    from a preference model, which pairs do not carry.
    """

    def __init__(self, beta: float = 0.1, ld_alpha: float | None = None, wpo: bool = False):
        super().__init__(beta, ld_alpha, wpo)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return (r.chosen - 0.5 / self.beta) ** 2 + (r.rejected + 0.5 / self.beta) ** 2


class AOTLoss(PairedLoss):
    """Alignment via Optimal Transport, paired (Melnyk et al., 2024, Eq. 9): distributional
    dominance of the policy's log-ratio margins over the reference's, via sorting in the batch:

        m = sort_batch(pi_w - pi_l),  m_ref = sort_batch(ref_w - ref_l),  x = beta (m - m_ref)
        loss = -(1 - eps) log sigmoid(x) - eps log sigmoid(-x)

    Summed log-probs; needs a reference; the sort runs over the micro batch (a batch-level
    loss: larger micro batches estimate the distributions better); equals TRL's `aot`.
    Not combinable with WPO (pairs lose their identity when sorted).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, ld_alpha: float | None = None):
        problems: list[str] = []
        check_smoothing(problems, label_smoothing)
        super().__init__(beta, ld_alpha, False, problems)
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
    """

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        x = torch.sort(r.chosen, dim=0).values - torch.sort(r.rejected, dim=0).values
        return smoothed_sigmoid(self.beta * x, self.label_smoothing)


class APOZeroLoss(PairedLoss):
    """Anchored Preference Optimization, APO-zero (D'Oosterlinck et al., 2024, Eq. 7): for
    chosen responses better than the model's own outputs; pushes chosen up, rejected down:

        loss = (1 - sigmoid(beta h_w)) + sigmoid(beta h_l)

    Summed log-probs; needs a reference; equals TRL's `apo_zero`. The paper uses beta = 0.1.
    """

    def __init__(self, beta: float = 0.1, ld_alpha: float | None = None, wpo: bool = False):
        super().__init__(beta, ld_alpha, wpo)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        return (1 - torch.sigmoid(self.beta * r.chosen)) + torch.sigmoid(self.beta * r.rejected)


class APODownLoss(PairedLoss):
    """APO-down (D'Oosterlinck et al., 2024, Eq. 8): for chosen responses worse than the
    model's own outputs; pushes both down, the rejected one more:

        loss = sigmoid(beta h_w) + (1 - sigmoid(beta (h_w - h_l)))

    Summed log-probs; needs a reference; equals TRL's `apo_down`.
    """

    def __init__(self, beta: float = 0.1, ld_alpha: float | None = None, wpo: bool = False):
        super().__init__(beta, ld_alpha, wpo)

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
    """

    def __init__(self, beta: float = 0.1, dpop_lambda: float = 50.0, ld_alpha: float | None = None, wpo: bool = False):
        problems: list[str] = []
        if not dpop_lambda >= 0:
            problems.append(f"dpop_lambda={dpop_lambda} must be >= 0 (0 = plain DPO; the paper uses 50)")
        super().__init__(beta, ld_alpha, wpo, problems)
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
    """

    def __init__(self, beta: float = 0.1, alpha: float = 0.01, ld_alpha: float | None = None, wpo: bool = False):
        problems: list[str] = []
        if not alpha >= 0:
            problems.append(f"alpha={alpha} must be >= 0 (0 = plain DPO)")
        super().__init__(beta, ld_alpha, wpo, problems)
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
    """

    def __init__(self, beta: float = 0.002, ld_alpha: float | None = None, wpo: bool = False):
        super().__init__(beta, ld_alpha, wpo)

    def pair_losses(self, r: Ratios) -> torch.Tensor:
        target = 1 / (2 * self.beta)
        return -F.logsigmoid(r.chosen - r.rejected) + (r.chosen - target) ** 2 + (r.rejected + target) ** 2
