"""Every loss in `dpo_cli.losses` against numbers worked out by hand, then the properties its
formula implies, its capability flags and its argument checks.

Each hand-worked test does the arithmetic in its docstring on made-up log-probs and checks the
per-example `losses` and the batch `loss` twice: against the closed form written with `math`
(independently of the torch code, to float64 precision) and against the literal 7-decimal
numbers of the docstring (to 1e-7). Log-probs are float64 so that both hold.

Shorthand in the docstrings: sp(x) = log(1 + exp(x)), so -log sigmoid(x) = sp(-x) and
log sigmoid(x) = -sp(-x); sig(x) = sigmoid(x). h_w, h_l are the policy-minus-reference
log-ratios of the chosen and rejected response, a_w, a_l per-token mean log-probs.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

import dpo_cli.losses as losses_pkg
from dpo_cli import logprobs
from dpo_cli.losses import (
    AOTLoss,
    AOTUnpairedLoss,
    APODownLoss,
    APOZeroLoss,
    BCOPairLoss,
    CalDPOLoss,
    Combination,
    CPOLoss,
    DiscoPOPLoss,
    DPOLoss,
    DPOPLoss,
    EXOPairLoss,
    HingeLoss,
    IPOLoss,
    KTOLoss,
    Loss,
    LossOutput,
    NCAPairLoss,
    ORPOLoss,
    RDPOLoss,
    RobustDPOLoss,
    RoleValues,
    SequenceLogps,
    SFTLoss,
    SigmoidNormLoss,
    SimPERLoss,
    SimPOLoss,
    SPPOHardLoss,
)
from dpo_cli.losses.modifiers import FDivergence, LengthDesensitized, PairWeights

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

F64 = torch.float64

# The loss families, spelled out so that the parametrized tests below say what they cover
# (`test_the_lists_cover_every_loss` keeps them honest).
F_DIVERGENCE = [DPOLoss, RobustDPOLoss, HingeLoss, IPOLoss, SigmoidNormLoss, EXOPairLoss, DiscoPOPLoss]
PAIRED = F_DIVERGENCE + [
    NCAPairLoss,
    BCOPairLoss,
    SPPOHardLoss,
    AOTLoss,
    AOTUnpairedLoss,
    APOZeroLoss,
    APODownLoss,
    DPOPLoss,
    RDPOLoss,
    CalDPOLoss,
]
REFERENCE_FREE = [SimPOLoss, CPOLoss, ORPOLoss, SimPERLoss, SFTLoss]
SINGLE = PAIRED + REFERENCE_FREE + [KTOLoss]
TAKES_BETA = PAIRED + [KTOLoss, SimPOLoss, CPOLoss, ORPOLoss]
TAKES_LABEL_SMOOTHING = [DPOLoss, RobustDPOLoss, AOTLoss, AOTUnpairedLoss, SimPOLoss, CPOLoss]
TAKES_WPO = [c for c in PAIRED if c not in (AOTLoss, AOTUnpairedLoss)]  # sorting loses the pairs


def name(cls: type) -> str:
    return cls.__name__


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def seqs(
    chosen: list[float],
    rejected: list[float],
    chosen_tokens: list[float] | None = None,
    rejected_tokens: list[float] | None = None,
    *,
    grad: bool = False,
    **optional: list[float],
) -> SequenceLogps:
    """float64 SequenceLogps. Token counts default to 7 and 3 (a loss on summed log-probs must
    not read them); `optional` fills the kl role's log-probs (kl=) and other kinds of a role by
    "<role>_<kind>" (chosen_shared, rejected_shared, chosen_wpo, rejected_wpo, chosen_whole, ...).
    grad=True makes the chosen and rejected log-probs leaves that require grad."""

    def leaf(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=F64, requires_grad=grad)

    roles = {
        "chosen": RoleValues(leaf(chosen), t(*(chosen_tokens or [7.0] * len(chosen)))),
        "rejected": RoleValues(leaf(rejected), t(*(rejected_tokens or [3.0] * len(rejected)))),
    }
    for name, values in optional.items():
        if name == "kl":
            roles["kl"] = RoleValues(t(*values), t(*[1.0] * len(values)))
        else:
            role, kind = name.split("_", 1)
            setattr(roles[role], kind, t(*values))
    return SequenceLogps(roles)


def pairs(grad: bool = False, **optional: list[float]) -> tuple[SequenceLogps, SequenceLogps]:
    """(policy, reference) of the two pairs most paired tests use:

    pair  policy (w, l)  reference (w, l)  h_w  h_l  h_w - h_l  |y_w|  |y_l|
    0     (-10, -14)     (-12, -11)          2   -3          5      2      3
    1     (-20, -15)     (-18, -23)         -2    8        -10      4      2
    """
    policy = seqs([-10.0, -20.0], [-14.0, -15.0], [2.0, 4.0], [3.0, 2.0], grad=grad, **optional)
    reference = seqs([-12.0, -18.0], [-11.0, -23.0], [2.0, 4.0], [3.0, 2.0])
    return policy, reference


def free_pairs(grad: bool = False) -> SequenceLogps:
    """The policy log-probs of the reference-free tests (no reference model):

        pair  pi_w  |y_w|  a_w   pi_l  |y_l|  a_l
        0      -2     2    -1     -6     3    -2
        1     -12     4    -3     -4     2    -2

    The NLL term is the token mean over the batch's chosen responses:
    NLL = (2 + 12) / (2 + 4) = 2.3333333, and pair i's share is -pi_w,i * B / sum |y_w|:
    2 * 2 / 6 = 0.6666667 and 12 * 2 / 6 = 4, whose mean is that NLL.
    The whole-sequence log-probs (ORPO's NLL span) equal the response's here: an empty prompt.
    """
    s = seqs([-2.0, -12.0], [-6.0, -4.0], [2.0, 4.0], [3.0, 2.0], grad=grad)
    s["chosen"].whole, s["chosen"].whole_tokens = s["chosen"].logps * 1.0, s["chosen"].tokens
    return s


NLL_SHARES = [2 * 2 / 6, 12 * 2 / 6]


def sp(x: float) -> float:
    """softplus: log(1 + exp(x)) = -log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def check(out: LossOutput, closed: list[float], literal: list[float], literal_mean: float, tol: float = 1e-12) -> None:
    """`losses` and `loss` against the closed form (to `tol`) and the docstring's numbers (to 1e-7)."""
    assert out.losses is not None
    assert_close(out.losses, t(*closed), rtol=0, atol=tol)
    assert_close(out.losses, t(*literal), rtol=0, atol=1e-7)
    assert_close(out.loss, torch.tensor(mean(closed), dtype=F64), rtol=0, atol=tol)
    assert_close(out.loss, torch.tensor(literal_mean, dtype=F64), rtol=0, atol=1e-7)


def check_rewards(out: LossOutput, chosen: list[float], rejected: list[float]) -> None:
    assert_close(out.chosen_rewards, t(*chosen), rtol=0, atol=1e-12)
    assert_close(out.rejected_rewards, t(*rejected), rtol=0, atol=1e-12)


def problems(make) -> list[str]:
    """The lines of the ValueError that `make()` raises."""
    with pytest.raises(ValueError) as info:
        make()
    return str(info.value).splitlines()


# --------------------------------------------------------------------------------------------
# DPO and cDPO
# --------------------------------------------------------------------------------------------


def test_dpo_hand_worked():
    """Standard pairs (`pairs`), beta = 0.1: loss = -log sigmoid(beta (h_w - h_l)) = sp(-x).

    Pair 0: x = 0.1 * (2 - (-3)) = 0.5, loss = log(1 + exp(-0.5)) = log(1.6065307) = 0.4740770
    Pair 1: x = 0.1 * (-2 - 8) = -1,    loss = log(1 + exp(1))    = log(3.7182818) = 1.3132617
    loss = (0.4740770 + 1.3132617) / 2 = 0.8936693
    Rewards beta * h: chosen (0.2, -0.2), rejected (-0.3, 0.8).
    """
    out = DPOLoss(beta=0.1)(*pairs())
    check(out, [sp(-0.5), sp(1.0)], [0.4740770, 1.3132617], 0.8936693)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


def test_cdpo_hand_worked():
    """cDPO, beta = 0.1, eps = 0.2: loss = (1 - eps) sp(-x) + eps sp(x) = sp(-x) + eps x,
    since sp(x) - sp(-x) = x.

    Pair 0: x = 0.5: 0.8 * 0.4740770 + 0.2 * 0.9740770 = 0.3792616 + 0.1948154 = 0.5740770
            (= 0.4740770 + 0.2 * 0.5)
    Pair 1: x = -1:  0.8 * 1.3132617 + 0.2 * 0.3132617 = 1.0506094 + 0.0626523 = 1.1132617
            (= 1.3132617 - 0.2)
    loss = 0.8436693. Smoothing changes the loss, not the rewards: (0.2, -0.2), (-0.3, 0.8).
    """
    out = DPOLoss(beta=0.1, label_smoothing=0.2)(*pairs())
    closed = [0.8 * sp(-x) + 0.2 * sp(x) for x in (0.5, -1.0)]
    check(out, closed, [0.5740770, 1.1132617], 0.8436693)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


@pytest.mark.parametrize("f_divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
def test_dpo_zero_margin_gives_log2(beta, f_divergence):
    """h_w = h_l (policy moved chosen and rejected alike): the score difference is 0 whatever f,
    and loss = -log sigmoid(0) = log 2, for any beta."""
    policy = seqs([-3.0, -50.0], [-8.0, -1.0])
    reference = seqs([-4.0, -49.0], [-9.0, 0.0])
    out = DPOLoss(beta=beta, f_divergence=f_divergence)(policy, reference)
    assert_close(out.losses, torch.full((2,), math.log(2), dtype=F64), rtol=0, atol=1e-12)


def test_label_smoothing_zero_is_plain_dpo():
    """eps = 0 drops the -eps log sigmoid(-beta h) term: the loss is softplus(-beta h)."""
    policy, reference = pairs()
    smoothed0 = DPOLoss(beta=0.3, label_smoothing=0.0)(policy, reference).losses
    h = (policy["chosen"].logps - reference["chosen"].logps) - (policy["rejected"].logps - reference["rejected"].logps)
    assert_close(smoothed0, torch.nn.functional.softplus(-0.3 * h), rtol=0, atol=1e-12)
    assert_close(smoothed0, DPOLoss(beta=0.3)(policy, reference).losses, rtol=0, atol=0)


def test_dpo_gradient():
    """d loss_i / d pi_w,i = -beta sigmoid(-beta h_i) and d loss_i / d pi_l,i = its negative;
    pair 0 has beta h = 0.5."""
    policy, reference = pairs(grad=True)
    DPOLoss(beta=0.1)(policy, reference).losses.sum().backward()
    assert_close(policy["chosen"].logps.grad, t(-0.1 * sig(-0.5), -0.1 * sig(1.0)), rtol=0, atol=1e-12)
    assert_close(policy["rejected"].logps.grad, -policy["chosen"].logps.grad, rtol=0, atol=0)


def test_dpo_loss_decreases_as_margin_grows():
    margins = torch.linspace(-20, 20, 41, dtype=F64)
    zeros = torch.zeros_like(margins)
    policy = SequenceLogps({"chosen": RoleValues(margins, zeros), "rejected": RoleValues(zeros, zeros)})
    reference = SequenceLogps({"chosen": RoleValues(zeros, zeros), "rejected": RoleValues(zeros, zeros)})
    losses = DPOLoss(beta=0.1)(policy, reference).losses
    assert torch.all(losses[1:] < losses[:-1])
    assert torch.all(losses > 0)


# --------------------------------------------------------------------------------------------
# Robust DPO, hinge, IPO, length-normalised sigmoid, EXO, DiscoPOP
# --------------------------------------------------------------------------------------------


def test_robust_dpo_hand_worked():
    """rDPO, beta = 0.1, eps = 0.2: loss = ((1 - eps) sp(-x) - eps sp(x)) / (1 - 2 eps)
    = sp(-x) - eps x / (1 - 2 eps)  (using sp(x) = sp(-x) + x).

    Pair 0: x = 0.5: (0.8 * 0.4740770 - 0.2 * 0.9740770) / 0.6 = 0.4740770 - 0.1666667 = 0.3074103
    Pair 1: x = -1:  (0.8 * 1.3132617 - 0.2 * 0.3132617) / 0.6 = 1.3132617 + 0.3333333 = 1.6465950
    loss = 0.9770027; rewards as DPO's.
    """
    out = RobustDPOLoss(beta=0.1, label_smoothing=0.2)(*pairs())
    closed = [(0.8 * sp(-x) - 0.2 * sp(x)) / 0.6 for x in (0.5, -1.0)]
    check(out, closed, [0.3074103, 1.6465950], 0.9770027)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


def test_robust_with_zero_smoothing_is_dpo():
    policy, reference = pairs()
    robust = RobustDPOLoss(beta=0.1, label_smoothing=0.0)(policy, reference)
    assert_close(robust.losses, DPOLoss(beta=0.1)(policy, reference).losses, rtol=0, atol=1e-15)


def test_robust_dpo_is_unbiased_under_label_flips():
    """rDPO's point (Chowdhury et al., 2024): if each label is flipped with probability eps, the
    expected robust loss is the clean DPO loss: (1 - eps) L_r(x) + eps L_r(-x) = L_dpo(x), which
    follows from sp(x) = sp(-x) + x. Flipping a label swaps chosen and rejected."""
    policy, reference = pairs()

    def flip(s: SequenceLogps) -> SequenceLogps:
        return seqs(s["rejected"].logps.tolist(), s["chosen"].logps.tolist())

    robust = RobustDPOLoss(beta=0.1, label_smoothing=0.2)
    expected = 0.8 * robust(policy, reference).losses + 0.2 * robust(flip(policy), flip(reference)).losses
    assert_close(expected, DPOLoss(beta=0.1)(policy, reference).losses, rtol=0, atol=1e-12)


def test_hinge_hand_worked():
    """SLiC hinge, beta = 0.25: loss = max(0, 1 - beta (h_w - h_l)).

    Pair 0: max(0, 1 - 0.25 * 5)   = max(0, -0.25) = 0   (beyond the margin 1/beta = 4)
    Pair 1: max(0, 1 - 0.25 * -10) = 3.5
    loss = 1.75; rewards 0.25 h: chosen (0.5, -0.5), rejected (-0.75, 2).
    """
    out = HingeLoss(beta=0.25)(*pairs())
    check(out, [max(0.0, 1 - 0.25 * 5), max(0.0, 1 + 0.25 * 10)], [0.0, 3.5], 1.75)
    check_rewards(out, [0.5, -0.5], [-0.75, 2.0])


def test_ipo_hand_worked_token_averaged():
    """IPO, beta = tau = 0.5: loss = (h_w / |y_w| - h_l / |y_l| - 1 / (2 tau))^2, 1 / (2 tau) = 1.

    Pair 0: 2 / 2 - (-3 / 3) = 2,      loss = (2 - 1)^2    = 1
    Pair 1: -2 / 4 - 8 / 2   = -4.5,   loss = (-4.5 - 1)^2 = 30.25
    loss = 15.625. (Summed log-ratios would give (5 - 1)^2 = 16 and (-10 - 1)^2 = 121.)
    Rewards are beta times the summed log-ratios: chosen (1, -1), rejected (-1.5, 4).
    """
    out = IPOLoss(beta=0.5)(*pairs())
    check(out, [(2 / 2 + 3 / 3 - 1) ** 2, (-2 / 4 - 8 / 2 - 1) ** 2], [1.0, 30.25], 15.625)
    check_rewards(out, [1.0, -1.0], [-1.5, 4.0])


def test_sigmoid_norm_hand_worked():
    """Length-normalised DPO, beta = 0.5: loss = -log sigmoid(beta (h_w / |y_w| - h_l / |y_l|)).

    Pair 0: 0.5 * (1 - (-1)) = 1,         loss = sp(-1)   = 0.3132617
    Pair 1: 0.5 * (-0.5 - 4) = -2.25,     loss = sp(2.25) = 2.3502066
    loss = 1.3317341; rewards beta h (summed): chosen (1, -1), rejected (-1.5, 4).
    """
    out = SigmoidNormLoss(beta=0.5)(*pairs())
    check(out, [sp(-1.0), sp(2.25)], [0.3132617, 2.3502066], 1.3317341)
    check_rewards(out, [1.0, -1.0], [-1.5, 4.0])


def test_exo_pair_hand_worked():
    """EXO, beta = 0.1, eps = 0.2:
    loss = sig(x) (log sig(x) - log 0.8) + sig(-x) (log sig(-x) - log 0.2), with
    log 0.8 = -0.2231436, log 0.2 = -1.6094379.

    Pair 0: x = 0.5: sig = 0.6224593 / 0.3775407, log sig = -0.4740770 / -0.9740770
            0.6224593 * -0.2509334 + 0.3775407 * 0.6353609 = -0.1561959 + 0.2398746 = 0.0836787
    Pair 1: x = -1:  sig = 0.2689414 / 0.7310586, log sig = -1.3132617 / -0.3132617
            0.2689414 * -1.0901181 + 0.7310586 * 1.2961762 = -0.2931779 + 0.9475807 = 0.6544028
    loss = 0.3690408; rewards as DPO's.
    """
    out = EXOPairLoss(beta=0.1, epsilon=0.2)(*pairs())
    closed = [sig(x) * (-sp(-x) - math.log(0.8)) + sig(-x) * (-sp(x) - math.log(0.2)) for x in (0.5, -1.0)]
    check(out, closed, [0.0836787, 0.6544028], 0.3690408)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


def test_exo_is_zero_where_the_policy_matches_the_smoothed_labels():
    """The reverse KL to (1 - eps, eps) vanishes where sig(x) = 1 - eps, x = log((1 - eps) / eps):
    for eps = 0.2, x = log 4, so h_w - h_l = 10 log 4 at beta = 0.1; anywhere else it is > 0."""
    margin = 10 * math.log(4)
    loss = EXOPairLoss(beta=0.1, epsilon=0.2)
    zeros = [0.0, 0.0, 0.0]
    out = loss(seqs([margin, margin + 1, margin - 1], zeros), seqs(zeros, zeros))
    assert_close(out.losses[0], torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-12)
    assert torch.all(out.losses[1:] > 1e-6)


def test_discopop_hand_worked():
    """DiscoPOP, beta = 0.1, tau = 0.5: m = sig(x / tau), loss = (1 - m) sp(-x) + m exp(-x).

    Pair 0: x = 0.5: m = sig(1) = 0.7310586
            0.2689414 * 0.4740770 + 0.7310586 * exp(-0.5) = 0.1274989 + 0.7310586 * 0.6065307
            = 0.1274989 + 0.4434094 = 0.5709084
    Pair 1: x = -1:  m = sig(-2) = 0.1192029
            0.8807971 * 1.3132617 + 0.1192029 * exp(1) = 1.1567171 + 0.1192029 * 2.7182818
            = 1.1567171 + 0.3240271 = 1.4807442
    loss = 1.0258263; rewards as DPO's.
    """
    out = DiscoPOPLoss(beta=0.1, tau=0.5)(*pairs())
    closed = [(1 - sig(x / 0.5)) * sp(-x) + sig(x / 0.5) * math.exp(-x) for x in (0.5, -1.0)]
    check(out, closed, [0.5709084, 1.4807442], 1.0258263)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


# --------------------------------------------------------------------------------------------
# NCA, BCO, SPPO, AOT, APO: losses on the chosen and rejected log-ratios separately
# --------------------------------------------------------------------------------------------
# With beta = 0.1 the standard pairs have beta h_w = (0.2, -0.2) and beta h_l = (-0.3, 0.8).


def test_nca_pair_hand_worked():
    """NCA, beta = 0.1: loss = sp(-w) + 1/2 sp(w) + 1/2 sp(l), w = beta h_w, l = beta h_l.

    Pair 0: w = 0.2, l = -0.3:  sp(-0.2) + sp(0.2) / 2 + sp(-0.3) / 2
            = 0.5981389 + 0.7981389 / 2 + 0.5543552 / 2 = 1.2743859
    Pair 1: w = -0.2, l = 0.8:  sp(0.2) + sp(-0.2) / 2 + sp(0.8) / 2
            = 0.7981389 + 0.5981389 / 2 + 1.1711007 / 2 = 1.6827586
    loss = 1.4785723; rewards (0.2, -0.2), (-0.3, 0.8).
    """
    out = NCAPairLoss(beta=0.1)(*pairs())
    closed = [sp(-w) + 0.5 * sp(w) + 0.5 * sp(lo) for w, lo in ((0.2, -0.3), (-0.2, 0.8))]
    check(out, closed, [1.2743859, 1.6827586], 1.4785723)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


def test_bco_pair_hand_worked():
    """BCO on pairs, beta = 0.1: loss = -log sig(w) - log sig(-l) = sp(-w) + sp(l).

    Pair 0: sp(-0.2) + sp(-0.3) = 0.5981389 + 0.5543552 = 1.1524941
    Pair 1: sp(0.2) + sp(0.8)   = 0.7981389 + 1.1711007 = 1.9692395
    loss = 1.5608668; rewards (0.2, -0.2), (-0.3, 0.8).
    """
    out = BCOPairLoss(beta=0.1)(*pairs())
    check(out, [sp(-0.2) + sp(-0.3), sp(0.2) + sp(0.8)], [1.1524941, 1.9692395], 1.5608668)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


def test_sppo_hard_hand_worked():
    """SPPO (hard labels), beta = 0.5, 1 / (2 beta) = 1: loss = (h_w - 1)^2 + (h_l + 1)^2.

    Pair 0: (2 - 1)^2 + (-3 + 1)^2 = 1 + 4  = 5
    Pair 1: (-2 - 1)^2 + (8 + 1)^2 = 9 + 81 = 90
    loss = 47.5; rewards 0.5 h: chosen (1, -1), rejected (-1.5, 4).
    """
    out = SPPOHardLoss(beta=0.5)(*pairs())
    check(out, [(2 - 1) ** 2 + (-3 + 1) ** 2, (-2 - 1) ** 2 + (8 + 1) ** 2], [5.0, 90.0], 47.5)
    check_rewards(out, [1.0, -1.0], [-1.5, 4.0])


def test_aot_hand_worked_sorts_in_the_batch():
    """AOT (paired), beta = 0.1: the policy's and the reference's margins are sorted separately.

    policy margins pi_w - pi_l = (-10 + 14, -20 + 15) = (4, -5)  -> sorted (-5, 4)
    reference margins          = (-12 + 11, -18 + 23) = (-1, 5)  -> sorted (-1, 5)
    x = 0.1 * ((-5) - (-1), 4 - 5) = (-0.4, -0.1)
    losses sp(0.4) = 0.9130153, sp(0.1) = 0.7443967; loss = 0.8287060
    (Unsorted, x would be DPO's (0.5, -1).) Rewards are the unsorted beta h, as DPO's.
    """
    out = AOTLoss(beta=0.1)(*pairs())
    check(out, [sp(0.4), sp(0.1)], [0.9130153, 0.7443967], 0.8287060)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


def test_aot_unpaired_hand_worked_sorts_in_the_batch():
    """AOT (unpaired), beta = 0.1: h_w and h_l are sorted separately.

    sorted h_w = (-2, 2), sorted h_l = (-3, 8); x = 0.1 * (-2 + 3, 2 - 8) = (0.1, -0.6)
    losses sp(-0.1) = 0.6443967, sp(0.6) = 1.0374880; loss = 0.8409423
    """
    out = AOTUnpairedLoss(beta=0.1)(*pairs())
    check(out, [sp(-0.1), sp(0.6)], [0.6443967, 1.0374880], 0.8409423)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


@pytest.mark.parametrize("cls", [AOTLoss, AOTUnpairedLoss], ids=name)
def test_aot_ignores_batch_order_and_is_dpo_on_one_pair(cls):
    """Sorting makes the per-position losses independent of the order of pairs in the batch;
    with a single pair there is nothing to sort and AOT is (c)DPO."""
    policy, reference = pairs()
    swapped = [
        seqs(s["chosen"].logps.flip(0).tolist(), s["rejected"].logps.flip(0).tolist()) for s in (policy, reference)
    ]
    loss = cls(beta=0.1, label_smoothing=0.1)
    assert_close(loss(*swapped).losses, loss(policy, reference).losses, rtol=0, atol=0)
    one = [seqs(s["chosen"].logps[:1].tolist(), s["rejected"].logps[:1].tolist()) for s in (policy, reference)]
    assert_close(loss(*one).losses, DPOLoss(beta=0.1, label_smoothing=0.1)(*one).losses, rtol=0, atol=1e-15)


def test_apo_zero_hand_worked():
    """APO-zero, beta = 0.1: loss = (1 - sig(w)) + sig(l).

    Pair 0: 1 - sig(0.2) + sig(-0.3)  = 1 - 0.5498340 + 0.4255575 = 0.8757235
    Pair 1: 1 - sig(-0.2) + sig(0.8)  = 1 - 0.4501660 + 0.6899745 = 1.2398085
    loss = 1.0577660; rewards (0.2, -0.2), (-0.3, 0.8).
    """
    out = APOZeroLoss(beta=0.1)(*pairs())
    check(out, [1 - sig(0.2) + sig(-0.3), 1 - sig(-0.2) + sig(0.8)], [0.8757235, 1.2398085], 1.0577660)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


def test_apo_down_hand_worked():
    """APO-down, beta = 0.1: loss = sig(w) + (1 - sig(beta (h_w - h_l))).

    Pair 0: sig(0.2) + 1 - sig(0.5)  = 0.5498340 + 1 - 0.6224593 = 0.9273747
    Pair 1: sig(-0.2) + 1 - sig(-1)  = 0.4501660 + 1 - 0.2689414 = 1.1812246
    loss = 1.0542996; rewards (0.2, -0.2), (-0.3, 0.8).
    """
    out = APODownLoss(beta=0.1)(*pairs())
    check(out, [sig(0.2) + 1 - sig(0.5), sig(-0.2) + 1 - sig(-1.0)], [0.9273747, 1.1812246], 1.0542996)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


# --------------------------------------------------------------------------------------------
# DPOP, R-DPO, Cal-DPO: DPO with an extra term
# --------------------------------------------------------------------------------------------


def test_dpop_hand_worked_penalty_inside_the_sigmoid():
    """DPOP, beta = 0.1, lambda = 2: loss = sp(-beta (h_w - h_l - lambda max(0, -h_w))).

    Pair 0: h_w = 2 >= 0, no penalty: x = 0.1 * 5 = 0.5, loss = 0.4740770 (DPO's)
    Pair 1: h_w = -2 < 0, penalty 2 * 2 = 4 inside, scaled by beta:
            x = 0.1 * (-2 - 8 - 4) = -1.4, loss = sp(1.4) = 1.6204174
            (outside the log-sigmoid it would be 1.3132617 + 4 = 5.3132617, or + 0.4 with beta)
    loss = 1.0472472; rewards (0.2, -0.2), (-0.3, 0.8).
    """
    out = DPOPLoss(beta=0.1, dpop_lambda=2.0)(*pairs())
    check(out, [sp(-0.5), sp(1.4)], [0.4740770, 1.6204174], 1.0472472)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


def test_dpop_with_lambda_zero_is_dpo():
    policy, reference = pairs()
    dpop = DPOPLoss(beta=0.1, dpop_lambda=0.0)(policy, reference)
    assert_close(dpop.losses, DPOLoss(beta=0.1)(policy, reference).losses, rtol=0, atol=1e-15)


def test_rdpo_hand_worked_uses_token_counts():
    """R-DPO, beta = 0.1, alpha = 0.25: loss = sp(-(beta (h_w - h_l) + alpha (|y_w| - |y_l|))).

    Pair 0: |y_w| - |y_l| = 2 - 3 = -1: x = 0.5 - 0.25 = 0.25, loss = sp(-0.25) = 0.5759394
    Pair 1: |y_w| - |y_l| = 4 - 2 = 2:  x = -1 + 0.5 = -0.5,   loss = sp(0.5)   = 0.9740770
    loss = 0.7750082; rewards are beta h only: (0.2, -0.2), (-0.3, 0.8).
    """
    out = RDPOLoss(beta=0.1, alpha=0.25)(*pairs())
    check(out, [sp(-0.25), sp(0.5)], [0.5759394, 0.9740770], 0.7750082)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


def test_rdpo_with_alpha_zero_is_dpo():
    policy, reference = pairs()
    rdpo = RDPOLoss(beta=0.1, alpha=0.0)(policy, reference)
    assert_close(rdpo.losses, DPOLoss(beta=0.1)(policy, reference).losses, rtol=0, atol=1e-15)


def test_caldpo_hand_worked():
    """Cal-DPO (the paper's Eq. 10), beta = 0.5, 1 / (2 beta) = 1:
    loss = sp(-(h_w - h_l)) + (h_w - 1)^2 + (h_l + 1)^2   (no beta in the sigmoid)

    Pair 0: sp(-5) + 1 + 4   = 0.0067153 + 5  = 5.0067153
    Pair 1: sp(10) + 9 + 81  = 10.0000454 + 90 = 100.0000454
    loss = 52.5033804 (the authors' code, halving the squares, would give 2.5067153 and 55.0000454).
    Rewards beta h: chosen (1, -1), rejected (-1.5, 4).
    """
    out = CalDPOLoss(beta=0.5)(*pairs())
    closed = [sp(-5.0) + (2 - 1) ** 2 + (-3 + 1) ** 2, sp(10.0) + (-2 - 1) ** 2 + (8 + 1) ** 2]
    check(out, closed, [5.0067153, 100.0000454], 52.5033804)
    check_rewards(out, [1.0, -1.0], [-1.5, 4.0])


# --------------------------------------------------------------------------------------------
# Modifiers: f-divergences, LD-DPO (ld_alpha), WPO
# --------------------------------------------------------------------------------------------


def f_pairs() -> tuple[SequenceLogps, SequenceLogps]:
    """Pairs with small log-ratios, so that exp(h) stays round: h_w = (1, 0), h_l = (0, 2)."""
    return seqs([-1.0, -3.0], [-5.0, -2.0]), seqs([-2.0, -3.0], [-5.0, -4.0])


F_CASES = {
    # (f_divergence, f_alpha): (score differences s(h_w) - s(h_l), literal losses, literal mean); beta = 1
    ("reverse_kl", 0.5): ([1.0, -2.0], [0.3132617, 2.1269280], 1.2200948),
    ("forward_kl", 0.5): ([1 - math.exp(-1), -(1 - math.exp(-2))], [0.4262239, 1.2161612], 0.8211925),
    ("js_divergence", 0.5): ([-sp(-1.0) + sp(0.0), -sp(0.0) + sp(-2.0)], [0.5211361, 1.0158081], 0.7684721),
    ("alpha_divergence", 0.5): ([2 * (1 - math.exp(-0.5)), -2 * (1 - math.exp(-1))], [0.3751683, 1.5130162], 0.9440922),
    ("alpha_divergence", 0.75): (
        [4 * (1 - math.exp(-0.25)), -4 * (1 - math.exp(-0.5))],
        [0.3455721, 1.7622142],
        1.0538932,
    ),
}


@pytest.mark.parametrize("f_divergence, f_alpha", list(F_CASES))
def test_f_divergence_hand_worked(f_divergence, f_alpha):
    """DPO, beta = 1, h_w = (1, 0), h_l = (0, 2): loss = sp(-(s(h_w) - s(h_l))).

    reverse_kl        s(h) = h:                 deltas (1, -2)
                      losses sp(-1) = 0.3132617, sp(2) = 2.1269280; loss 1.2200948
    forward_kl        s(h) = 1 - exp(-h):       s(1) = 0.6321206, s(0) = 0, s(2) = 0.8646647
                      deltas (0.6321206, -0.8646647); losses 0.4262239, 1.2161612; loss 0.8211925
    js_divergence     s(h) = log 2 + log sig(h): s(1) = 0.6931472 - 0.3132617 = 0.3798855,
                      s(0) = 0, s(2) = 0.6931472 - 0.1269280 = 0.5662192
                      deltas (0.3798855, -0.5662192); losses 0.5211361, 1.0158081; loss 0.7684721
    alpha_divergence  alpha = 0.5: s(h) = (exp(-h / 2) - 1) / (-1/2) = 2 (1 - exp(-h / 2)):
                      s(1) = 2 (1 - 0.6065307) = 0.7869387, s(2) = 2 (1 - 0.3678794) = 1.2642411
                      deltas (0.7869387, -1.2642411); losses 0.3751683, 1.5130162; loss 0.9440922
                      alpha = 0.75: s(h) = (exp(-h / 4) - 1) / (-1/4) = 4 (1 - exp(-h / 4)):
                      s(1) = 4 (1 - 0.7788008) = 0.8847969, s(2) = 4 (1 - 0.6065307) = 1.5738774
                      deltas (0.8847969, -1.5738774); losses 0.3455721, 1.7622142; loss 1.0538932
                      (0.5 is where this parametrisation and the u^-alpha one of Wang et al.'s
                      Table 1, alpha' = 1 - alpha, agree; 0.75 tells them apart.)
    Rewards stay beta h: chosen (1, 0), rejected (0, 2).
    """
    deltas, literal, literal_mean = F_CASES[(f_divergence, f_alpha)]
    out = DPOLoss(beta=1.0, f_divergence=f_divergence, f_alpha=f_alpha)(*f_pairs())
    # The alpha-divergence score is computed in float32 (paired.py clamps it there, as TRL does).
    tol = 1e-7 if f_divergence == "alpha_divergence" else 1e-12
    check(out, [sp(-d) for d in deltas], literal, literal_mean, tol=tol)
    check_rewards(out, [1.0, 0.0], [0.0, 2.0])


def test_alpha_divergence_limits():
    """s(h) = (exp((alpha - 1) h) - 1) / (alpha - 1): alpha = 1 is its limit h (reverse KL), and
    alpha = 0 gives 1 - exp(-h) (forward KL)."""
    policy, reference = pairs()
    for alpha, same_as in ((1.0, "reverse_kl"), (0.0, "forward_kl")):
        alpha_loss = DPOLoss(beta=0.1, f_divergence="alpha_divergence", f_alpha=alpha)(policy, reference)
        expected = DPOLoss(beta=0.1, f_divergence=same_as)(policy, reference)
        assert_close(alpha_loss.losses, expected.losses, rtol=0, atol=1e-6)
    exact = DPOLoss(beta=0.1, f_divergence="alpha_divergence", f_alpha=1.0)(policy, reference)
    assert_close(exact.losses, DPOLoss(beta=0.1)(policy, reference).losses, rtol=0, atol=0)


@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("cls", F_DIVERGENCE, ids=name)
def test_f_divergence_replaces_the_log_ratio_by_its_score(cls, f_divergence):
    """In every f-divergence loss, choosing f is the reverse-KL loss evaluated at s(h) instead of h
    (token-averaged losses average s(h) over tokens)."""
    policy, reference = pairs()
    loss = cls(beta=0.1, f_divergence=f_divergence)

    def scored(h: torch.Tensor) -> torch.Tensor:
        return 1 - torch.exp(-h) if f_divergence == "forward_kl" else math.log(2) + torch.nn.functional.logsigmoid(h)

    zeros = [0.0, 0.0]
    as_scores = seqs(
        scored(policy["chosen"].logps - reference["chosen"].logps).tolist(),
        scored(policy["rejected"].logps - reference["rejected"].logps).tolist(),
        policy["chosen"].tokens.tolist(),
        policy["rejected"].tokens.tolist(),
    )
    zero_reference = seqs(zeros, zeros, policy["chosen"].tokens.tolist(), policy["rejected"].tokens.tolist())
    reverse = cls(beta=0.1)(as_scores, zero_reference)
    assert_close(loss(policy, reference).losses, reverse.losses, rtol=0, atol=1e-12)


def ld_pairs() -> tuple[SequenceLogps, SequenceLogps]:
    """Pairs with shared-prefix log-probs (the first min(|y_w|, |y_l|) response tokens):

               |y_w| |y_l|  policy w (shared)  policy l (shared)  ref w (shared)  ref l (shared)
    pair 0       4     2      -10 (-4)           -6 (-6)           -8 (-5)          -7 (-7)
    pair 1       2     3       -4 (-4)          -12 (-8)           -5 (-5)          -9 (-6)
    """
    policy = seqs(
        [-10.0, -4.0], [-6.0, -12.0], [4.0, 2.0], [2.0, 3.0], chosen_shared=[-4.0, -4.0], rejected_shared=[-6.0, -8.0]
    )
    reference = seqs(
        [-8.0, -5.0], [-7.0, -9.0], [4.0, 2.0], [2.0, 3.0], chosen_shared=[-5.0, -5.0], rejected_shared=[-7.0, -6.0]
    )
    return policy, reference


def test_ld_alpha_hand_worked():
    """LD-DPO, ld_alpha = 0.5, beta = 0.2: logp = shared + 0.5 (logp - shared), for policy and
    reference alike.

    policy w = (-4 + 0.5 * -6, -4) = (-7, -4)      policy l = (-6, -8 + 0.5 * -4) = (-6, -10)
    ref w = (-5 + 0.5 * -3, -5) = (-6.5, -5)      ref l = (-7, -6 + 0.5 * -3) = (-7, -7.5)
    h_w = (-0.5, 1), h_l = (1, -2.5), h_w - h_l = (-1.5, 3.5), x = 0.2 * that = (-0.3, 0.7)
    losses sp(0.3) = 0.8543552, sp(-0.7) = 0.4031860; loss 0.6287706
    (plain DPO: h_w - h_l = (-3, 4), losses 1.0374880, 0.3711007)
    Rewards are beta h after LD: chosen (-0.1, 0.2), rejected (0.2, -0.5).
    """
    out = DPOLoss(beta=0.2, ld_alpha=0.5)(*ld_pairs())
    check(out, [sp(0.3), sp(-0.7)], [0.8543552, 0.4031860], 0.6287706)
    check_rewards(out, [-0.1, 0.2], [0.2, -0.5])


@pytest.mark.parametrize("cls", PAIRED, ids=name)
def test_ld_alpha_one_is_plain(cls):
    policy, reference = ld_pairs()
    assert_close(cls(ld_alpha=1.0)(policy, reference).losses, cls()(policy, reference).losses, rtol=0, atol=0)


def test_ld_alpha_zero_uses_only_the_shared_tokens():
    """ld_alpha = 0: h_w = (-4 + 5, -4 + 5) = (1, 1), h_l = (-6 + 7, -8 + 6) = (1, -2): DPO on the
    shared log-probs alone, x = 0.2 * (0, 3): losses log 2 = 0.6931472 and sp(-0.6) = 0.4374880."""
    policy, reference = ld_pairs()
    out = DPOLoss(beta=0.2, ld_alpha=0.0)(policy, reference)
    check(out, [math.log(2), sp(-0.6)], [0.6931472, 0.4374880], 0.5653176)

    def shared_only(s: SequenceLogps) -> SequenceLogps:
        return seqs(s["chosen"].shared.tolist(), s["rejected"].shared.tolist())

    assert_close(out.losses, DPOLoss(beta=0.2)(shared_only(policy), shared_only(reference)).losses, rtol=0, atol=0)


def test_wpo_hand_worked():
    """WPO, beta = 0.1, standard pairs with chosen_wpo = (0, -1), rejected_wpo = (0, -1):
    weights exp(0 + 0) = 1 and exp(-1 - 1) = 0.1353353.

    Pair 0: 1 * 0.4740770 = 0.4740770
    Pair 1: 0.1353353 * 1.3132617 = 0.1777306
    loss = 0.3259038; rewards unweighted: (0.2, -0.2), (-0.3, 0.8).
    """
    out = DPOLoss(beta=0.1, wpo=True)(*pairs(chosen_wpo=[0.0, -1.0], rejected_wpo=[0.0, -1.0]))
    check(out, [sp(-0.5), math.exp(-2) * sp(1.0)], [0.4740770, 0.1777306], 0.3259038)
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


@pytest.mark.parametrize("cls", TAKES_WPO, ids=name)
def test_wpo_multiplies_each_pair_by_its_weights(cls):
    wpo = {"chosen_wpo": [-0.5, -2.0], "rejected_wpo": [-1.0, -0.25]}
    weights = t(math.exp(-1.5), math.exp(-2.25))
    plain = cls()(*pairs(**wpo)).losses
    assert_close(
        cls(wpo=True)(*pairs(**wpo)).losses, plain * weights, rtol=1e-13, atol=1e-12
    )  # Cal-DPO at beta 0.002 reaches ~1e4


# --------------------------------------------------------------------------------------------
# Reference-free: SimPO, CPO, ORPO, SimPER, SFT (policy log-probs of `free_pairs`)
# --------------------------------------------------------------------------------------------


def test_simpo_hand_worked():
    """SimPO, beta = 2, gamma = 1: loss = sp(-(beta (a_w - a_l) - gamma)), mean log-probs.

    Pair 0: a_w - a_l = -1 + 2 = 1:   x = 2 - 1 = 1,   loss = sp(-1) = 0.3132617
    Pair 1: a_w - a_l = -3 + 2 = -1:  x = -2 - 1 = -3, loss = sp(3)  = 3.0485874
    loss = 1.6809245; rewards beta a: chosen (-2, -6), rejected (-4, -4); no nll_loss metric.
    """
    out = SimPOLoss(beta=2.0, gamma=1.0)(free_pairs(), None)
    check(out, [sp(-1.0), sp(3.0)], [0.3132617, 3.0485874], 1.6809245)
    check_rewards(out, [-2.0, -6.0], [-4.0, -4.0])
    assert "nll_loss" not in out.metrics


def test_cpo_simpo_hand_worked():
    """SimPO with nll_weight = 0.5 (CPO-SimPO): each pair adds 0.5 times its NLL share.

    Pair 0: 0.3132617 + 0.5 * 0.6666667 = 0.6465950
    Pair 1: 3.0485874 + 0.5 * 4         = 5.0485874
    loss = 1.6809245 + 0.5 * 2.3333333 = 2.8475912; metric nll_loss = 2.3333333.
    """
    out = SimPOLoss(beta=2.0, gamma=1.0, nll_weight=0.5)(free_pairs(), None)
    closed = [sp(-1.0) + 0.5 * NLL_SHARES[0], sp(3.0) + 0.5 * NLL_SHARES[1]]
    check(out, closed, [0.6465950, 5.0485874], 2.8475912)
    assert_close(out.metrics["nll_loss"], torch.tensor(14 / 6, dtype=F64), rtol=0, atol=1e-12)
    check_rewards(out, [-2.0, -6.0], [-4.0, -4.0])


def test_cpo_hand_worked():
    """CPO, beta = 0.1, nll_weight = 1: loss = sp(-beta (pi_w - pi_l)) + NLL share, summed log-probs.

    Pair 0: pi_w - pi_l = -2 + 6 = 4:   sp(-0.4) + 0.6666667 = 0.5130153 + 0.6666667 = 1.1796819
    Pair 1: pi_w - pi_l = -12 + 4 = -8: sp(0.8) + 4          = 1.1711007 + 4         = 5.1711007
    loss = 3.1753913; nll_loss = 2.3333333; rewards beta pi: chosen (-0.2, -1.2), rejected (-0.6, -0.4).
    """
    out = CPOLoss(beta=0.1, nll_weight=1.0)(free_pairs(), None)
    check(out, [sp(-0.4) + NLL_SHARES[0], sp(0.8) + NLL_SHARES[1]], [1.1796819, 5.1711007], 3.1753913)
    assert_close(out.metrics["nll_loss"], torch.tensor(14 / 6, dtype=F64), rtol=0, atol=1e-12)
    check_rewards(out, [-0.2, -1.2], [-0.6, -0.4])


def test_orpo_hand_worked():
    """ORPO, beta = 0.1: log_odds = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l)),
    loss = NLL share - beta log sig(log_odds).

    log(1 - e^-1) = log 0.6321206 = -0.4586751, log(1 - e^-2) = log 0.8646647 = -0.1454135,
    log(1 - e^-3) = log 0.9502129 = -0.0510692.
    Pair 0: log_odds = 1 - (-0.4586751 + 0.1454135) = 1.3132617, log sig = -0.2381830
            loss = 0.6666667 + 0.0238183 = 0.6904850
    Pair 1: log_odds = -1 - (-0.0510692 + 0.1454135) = -1.0943443, log sig = -1.3830951
            loss = 4 + 0.1383095 = 4.1383095
    loss = 2.4143972. Metrics: nll_loss 2.3333333, log_odds_ratio (-0.2381830 - 1.3830951) / 2
    = -0.8106390, log_odds_chosen (1.3132617 - 1.0943443) / 2 = 0.1094587.
    Rewards beta a: chosen (-0.1, -0.3), rejected (-0.2, -0.2).
    """
    out = ORPOLoss(beta=0.1)(free_pairs(), None)

    def log1mexp(a: float) -> float:
        return math.log(1 - math.exp(a))

    log_odds = [(aw - al) - (log1mexp(aw) - log1mexp(al)) for aw, al in ((-1.0, -2.0), (-3.0, -2.0))]
    ratios = [-sp(-x) for x in log_odds]
    check(out, [n - 0.1 * r for n, r in zip(NLL_SHARES, ratios, strict=True)], [0.6904850, 4.1383095], 2.4143972)
    metrics = {"nll_loss": (14 / 6, 2.3333333), "log_odds_ratio": (mean(ratios), -0.8106390)}
    metrics["log_odds_chosen"] = (mean(log_odds), 0.1094587)
    for name, (closed, literal) in metrics.items():
        assert_close(out.metrics[name], torch.tensor(closed, dtype=F64), rtol=0, atol=1e-12)
        assert_close(out.metrics[name], torch.tensor(literal, dtype=F64), rtol=0, atol=1e-7)
    check_rewards(out, [-0.1, -0.3], [-0.2, -0.2])


def test_orpo_nll_spans_prompt_and_response_unless_told_otherwise():
    """The same pairs with 2 prompt tokens each of log-probs -4 and -6 (every token but the
    first counts): whole chosen log-probs (-6, -18) over (4, 6) tokens, so
    NLL = (6 + 18) / (4 + 6) = 2.4 and the loss rises by 2.4 - 2.3333333 = 0.0666667 to
    2.4810639; with prompt_nll=False the prompt is ignored (2.4143972)."""
    policy = free_pairs()
    policy["chosen"].whole = policy["chosen"].logps + torch.tensor([-4.0, -6.0], dtype=F64)
    policy["chosen"].whole_tokens = policy["chosen"].tokens + 2
    whole = ORPOLoss(beta=0.1)(policy, None)
    assert_close(whole.metrics["nll_loss"], torch.tensor(2.4, dtype=F64), rtol=0, atol=1e-12)
    assert_close(whole.loss, torch.tensor(2.4810639, dtype=F64), rtol=0, atol=1e-7)
    response_only = ORPOLoss(beta=0.1, prompt_nll=False)(policy, None)
    assert_close(response_only.loss, torch.tensor(2.4143972, dtype=F64), rtol=0, atol=1e-7)
    assert ORPOLoss().needs == frozenset({logprobs.WHOLE})
    assert ORPOLoss(prompt_nll=False).needs == frozenset()


def test_simper_hand_worked():
    """SimPER: loss = -exp(a_w) + exp(a_l).

    Pair 0: -e^-1 + e^-2 = -0.3678794 + 0.1353353 = -0.2325442
    Pair 1: -e^-3 + e^-2 = -0.0497871 + 0.1353353 =  0.0855482
    loss = -0.0734980; rewards a: chosen (-1, -3), rejected (-2, -2).
    """
    out = SimPERLoss()(free_pairs(), None)
    closed = [-math.exp(-1) + math.exp(-2), -math.exp(-3) + math.exp(-2)]
    check(out, closed, [-0.2325442, 0.0855482], -0.0734980)
    check_rewards(out, [-1.0, -3.0], [-2.0, -2.0])


def test_sft_hand_worked_batch_token_mean():
    """SFT: the batch's token-mean NLL of the chosen responses, as per-pair shares.

    shares 2 * 2 / 6 = 0.6666667 and 12 * 2 / 6 = 4; loss = (2 + 12) / (2 + 4) = 2.3333333,
    not the mean of per-pair means (1 + 3) / 2 = 2. Rejected responses play no part.
    Rewards a: chosen (-1, -3), rejected (-2, -2).
    """
    policy = free_pairs()
    out = SFTLoss()(policy, None)
    check(out, NLL_SHARES, [0.6666667, 4.0], 2.3333333)
    assert_close(out.loss, -policy["chosen"].logps.sum() / policy["chosen"].tokens.sum(), rtol=0, atol=1e-15)
    assert abs(out.loss.item() - 2.0) > 0.3
    check_rewards(out, [-1.0, -3.0], [-2.0, -2.0])


def test_sft_ignores_rejected():
    policy = free_pairs(grad=True)
    SFTLoss()(policy, None).loss.backward()
    assert policy["rejected"].logps.grad is None or torch.all(policy["rejected"].logps.grad == 0)
    assert_close(policy["chosen"].logps.grad, t(-1 / 6, -1 / 6), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------------
# KTO: unpaired desirable (CHOSEN) and undesirable (REJECTED) examples, with KL rows
# --------------------------------------------------------------------------------------------


def kto_batch(policy_kl: list[float], reference_kl: list[float], grad: bool = False) -> tuple[SequenceLogps, ...]:
    """Two desirable examples, h = (-10 + 12, -20 + 18) = (2, -2), one undesirable, h = -14 + 11
    = -3, and three KL rows."""
    policy = seqs([-10.0, -20.0], [-14.0], grad=grad, kl=policy_kl)
    if grad:
        policy["kl"].logps.requires_grad_(True)
    return policy, seqs([-12.0, -18.0], [-11.0], kl=reference_kl)


def kto_closed(z0: float, beta: float = 0.5, desirable: float = 1.0, undesirable: float = 2.0) -> list[float]:
    return [desirable * (1 - sig(beta * (h - z0))) for h in (2.0, -2.0)] + [undesirable * (1 - sig(beta * (z0 + 3)))]


def test_kto_hand_worked():
    """KTO, beta = 0.5, lambda_D = 1, lambda_U = 2. KL rows: policy (-5, -7, -9), reference
    (-6, -7, -11): z0 = max(0, mean(1, 0, 2)) = 1.

    desirable h = 2:    1 - sig(0.5 * (2 - 1))  = 1 - sig(0.5)  = 1 - 0.6224593 = 0.3775407
    desirable h = -2:   1 - sig(0.5 * (-2 - 1)) = 1 - sig(-1.5) = 1 - 0.1824255 = 0.8175745
    undesirable h = -3: 2 (1 - sig(0.5 * (1 + 3))) = 2 (1 - 0.8807971) = 0.2384058
    loss = mean over the 3 examples = 1.4335210 / 3 = 0.4778403; kl = 1.
    Rewards beta h: chosen (1, -1), rejected (-1.5).
    """
    out = KTOLoss(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)(
        *kto_batch([-5.0, -7.0, -9.0], [-6.0, -7.0, -11.0])
    )
    check(out, kto_closed(1.0), [0.3775407, 0.8175745, 0.2384058], 0.4778403)
    assert_close(out.metrics["kl"], torch.tensor(1.0, dtype=F64), rtol=0, atol=0)
    check_rewards(out, [1.0, -1.0], [-1.5])


def test_kto_kl_is_clamped_at_zero():
    """KL rows policy (-7, -9, -9), reference (-6, -7, -9): mean(-1, -2, 0) = -1, so z0 = 0.

    1 - sig(1) = 0.2689414, 1 - sig(-1) = 0.7310586, 2 (1 - sig(1.5)) = 2 * 0.1824255 = 0.3648510
    loss = 0.4549503; kl = 0.
    """
    loss = KTOLoss(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    out = loss(*kto_batch([-7.0, -9.0, -9.0], [-6.0, -7.0, -9.0]))
    check(out, kto_closed(0.0), [0.2689414, 0.7310586, 0.3648510], 0.4549503)
    assert out.metrics["kl"].item() == 0.0


def test_kto_applies_reduce_to_the_kl_estimate():
    """`reduce` turns the local KL estimate into the mean over processes, before the clamp.

    Doubling reduce, KL rows of the hand-worked test: z0 = 2 * 1 = 2;
    1 - sig(0) = 0.5, 1 - sig(-2) = 0.8807971, 2 (1 - sig(2.5)) = 2 * 0.0758582 = 0.1517164,
    loss = 0.5108378, kl = 2.
    A second process with KL 2 and this one at -1 (clamp test's rows): (-1 + 2) / 2 = 0.5, not
    (0 + 2) / 2 = 1, which clamping first would give.
    """
    loss = KTOLoss(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    out = loss(*kto_batch([-5.0, -7.0, -9.0], [-6.0, -7.0, -11.0]), reduce=lambda x: 2 * x)
    check(out, kto_closed(2.0), [0.5, 0.8807971, 0.1517164], 0.5108378)
    assert_close(out.metrics["kl"], torch.tensor(2.0, dtype=F64), rtol=0, atol=0)

    out = loss(*kto_batch([-7.0, -9.0, -9.0], [-6.0, -7.0, -9.0]), reduce=lambda x: (x + 2) / 2)
    assert_close(out.metrics["kl"], torch.tensor(0.5, dtype=F64), rtol=0, atol=0)
    assert_close(out.losses, t(*kto_closed(0.5)), rtol=0, atol=1e-12)


def test_kto_kl_rows_take_no_gradient():
    policy, reference = kto_batch([-5.0, -7.0, -9.0], [-6.0, -7.0, -11.0], grad=True)
    out = KTOLoss()(policy, reference)
    assert not out.metrics["kl"].requires_grad
    out.loss.backward()
    assert policy["kl"].logps.grad is None
    assert policy["chosen"].logps.grad is not None and policy["rejected"].logps.grad is not None


# --------------------------------------------------------------------------------------------
# Combination
# --------------------------------------------------------------------------------------------


def test_combination_hand_worked_weights_add_up_exactly():
    """0.5 * DPO + 2 * SFT on the standard pairs: DPO 0.8936693; SFT = (10 + 20) / (2 + 4) = 5;
    loss = 0.5 * 0.8936693 + 2 * 5 = 10.4468347. Metrics loss/dpo, loss/sft are the unweighted
    term losses; rewards are the first term's."""
    terms = {"dpo": DPOLoss(beta=0.1), "sft": SFTLoss()}
    combo = Combination(terms, {"dpo": 0.5, "sft": 2.0})
    policy, reference = pairs()
    out = combo(policy, reference)
    dpo, sft = terms["dpo"](policy, reference), terms["sft"](policy, None)
    assert torch.equal(out.loss, 0.5 * dpo.loss + 2.0 * sft.loss)
    assert_close(out.loss, torch.tensor(0.5 * (sp(-0.5) + sp(1.0)) / 2 + 2 * 5, dtype=F64), rtol=0, atol=1e-12)
    assert_close(out.loss, torch.tensor(10.4468347, dtype=F64), rtol=0, atol=1e-7)
    assert torch.equal(out.metrics["loss/dpo"], dpo.loss.detach())
    assert torch.equal(out.metrics["loss/sft"], sft.loss.detach())
    assert out.losses is None
    check_rewards(out, [0.2, -0.2], [-0.3, 0.8])


def test_combination_default_weight_is_one():
    terms = {"dpo": DPOLoss(beta=0.1), "sft": SFTLoss()}
    combo = Combination(terms, {"sft": 0.5})
    assert combo.weights == {"dpo": 1.0, "sft": 0.5}
    assert Combination(terms).weights == {"dpo": 1.0, "sft": 1.0}
    policy, reference = pairs()
    out = combo(policy, reference)
    assert torch.equal(out.loss, 1.0 * terms["dpo"](policy, reference).loss + 0.5 * terms["sft"](policy, None).loss)


def test_combination_gives_reference_free_terms_no_reference_and_passes_reduce():
    class Spy(Loss):
        requires_reference = False

        def __call__(self, policy, reference, reduce=lambda x: x):
            self.seen = reference
            return SFTLoss()(policy, None)

    spy = Spy()
    combo = Combination({"kto": KTOLoss(beta=0.5, undesirable_weight=2.0), "spy": spy})
    out = combo(*kto_batch([-5.0, -7.0, -9.0], [-6.0, -7.0, -11.0]), reduce=lambda x: 2 * x)
    assert spy.seen is None
    assert_close(out.metrics["kl"], torch.tensor(2.0, dtype=F64), rtol=0, atol=0)


def test_combination_prefixes_metric_names_two_terms_share():
    combo = Combination({"cpo": CPOLoss(), "orpo": ORPOLoss()})
    out = combo(free_pairs(), None)
    assert set(out.metrics) == {
        "loss/cpo",
        "loss/orpo",
        "cpo/nll_loss",
        "orpo/nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
    }


@pytest.mark.parametrize(
    "terms, weights, expected",
    [
        ({}, None, "terms is empty: add terms with +loss@loss.terms.NAME=LOSS"),
        ({"dpo": DPOLoss()}, {"ipo": 1.0}, "weights.ipo=1.0 names no term; the terms are: dpo"),
        (
            {"dpo": DPOLoss(), "inner": Combination({"sft": SFTLoss()})},
            None,
            "terms.inner is itself a combination; list its terms here instead",
        ),
        ({"dpo": DPOLoss(), "sft": "sft"}, None, "terms.sft is not a loss"),
        ({"dpo": DPOLoss()}, {"dpo": -1.0}, "weights.dpo=-1.0 must be a number >= 0"),
    ],
)
def test_combination_rejects_bad_terms_and_weights(terms, weights, expected):
    lines = problems(lambda: Combination(terms, weights))
    assert len(lines) == 1
    assert lines[0].startswith(expected)


def test_combination_reports_every_problem_at_once():
    lines = problems(lambda: Combination({"a": Combination({"b": SFTLoss()}), "c": 3}, {"d": 1.0, "a": -2}))
    assert [line.split(" ")[0] for line in lines] == ["terms.a", "terms.c", "weights.d=1.0", "weights.a=-2"]


# --------------------------------------------------------------------------------------------
# Properties of every loss: gradients, reductions, capability flags
# --------------------------------------------------------------------------------------------


def every_loss():
    """One instance of each loss (defaults), each modifier, and a combination."""
    cases = [pytest.param(cls, id=cls.__name__) for cls in SINGLE]
    cases.append(pytest.param(lambda: DPOLoss(ld_alpha=0.5, wpo=True), id="DPOLoss-ld_alpha-wpo"))
    cases.append(pytest.param(lambda: DPOLoss(f_divergence="js_divergence"), id="DPOLoss-js"))
    cases.append(pytest.param(lambda: Combination({"dpo": DPOLoss(), "sft": SFTLoss()}), id="Combination"))
    return cases


def test_the_lists_cover_every_loss():
    exported = {obj for obj in vars(losses_pkg).values() if inspect.isclass(obj) and issubclass(obj, Loss)}
    assert exported - {Loss, Combination} == set(SINGLE)
    assert len(SINGLE) == len(set(SINGLE)) == 23
    assert {c for c in SINGLE if "beta" in inspect.signature(c).parameters} == set(TAKES_BETA)
    assert {c for c in SINGLE if "label_smoothing" in inspect.signature(c).parameters} == set(TAKES_LABEL_SMOOTHING)
    assert {c for c in SINGLE if PairWeights in c.accepts} == set(TAKES_WPO)
    assert {c for c in SINGLE if FDivergence in c.accepts} == set(F_DIVERGENCE)
    assert {c for c in SINGLE if LengthDesensitized in c.accepts} == set(PAIRED)


@pytest.mark.parametrize("cls", SINGLE, ids=name)
def test_a_loss_refuses_the_keys_of_modifiers_it_does_not_accept(cls):
    """Each modifier key is accepted exactly by the losses that list its modifier in `accepts`;
    any other loss refuses it as an unknown keyword argument (and its schema has no such key)."""
    for modifier, key, value in ((LengthDesensitized, "ld_alpha", 0.5), (PairWeights, "wpo", True),
                                 (FDivergence, "f_divergence", "forward_kl"), (FDivergence, "f_alpha", 0.3)):  # fmt: skip
        if modifier in cls.accepts:
            assert getattr(cls(**{key: value}).modifiers[cls.accepts.index(modifier)], key) == value
        else:
            with pytest.raises(TypeError, match=key):
                cls(**{key: value})


@pytest.mark.parametrize("make", every_loss())
def test_rewards_carry_no_gradient_loss_does(make):
    loss = make()
    shared = {"chosen_shared": [-6.0, -20.0], "rejected_shared": [-14.0, -11.0]}
    policy, reference = pairs(grad=True, kl=[-5.0, -7.0], chosen_wpo=[-0.5, -1.0], rejected_wpo=[-1.0, -0.5], **shared)
    reference.roles["kl"] = RoleValues(t(-6.0, -8.0), t(1.0, 1.0))
    reference["chosen"].shared, reference["rejected"].shared = t(-8.0, -18.0), t(-11.0, -20.0)
    policy["chosen"].whole, policy["chosen"].whole_tokens = policy["chosen"].logps - 3.0, policy["chosen"].tokens + 2
    out = loss(policy, reference if loss.requires_reference else None)
    assert out.loss.requires_grad and out.loss.dim() == 0
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.chosen_rewards.shape == (2,) and out.rejected_rewards.shape == (2,)
    assert not any(v.requires_grad for v in out.metrics.values())
    if out.losses is not None:
        assert_close(out.loss, out.losses.mean(), rtol=0, atol=0)
    out.loss.backward()
    assert policy["chosen"].logps.grad is not None and torch.all(torch.isfinite(policy["chosen"].logps.grad))
    assert policy["chosen"].logps.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", SINGLE, ids=name)
def test_requires_reference(cls):
    assert cls().requires_reference is (cls not in REFERENCE_FREE)


@pytest.mark.parametrize("cls", SINGLE, ids=name)
def test_paired(cls):
    """KTO and SFT also work on unpaired desirable / undesirable examples."""
    assert cls().paired is (cls not in (KTOLoss, SFTLoss))


def test_needs():
    assert KTOLoss().needs == frozenset({logprobs.KL_ROWS})
    assert DPOLoss().needs == frozenset()
    assert DPOLoss(ld_alpha=0.5).needs == frozenset({logprobs.SHARED})
    assert DPOLoss(wpo=True).needs == frozenset({logprobs.WPO})
    assert IPOLoss(ld_alpha=0.0, wpo=True).needs == frozenset({logprobs.SHARED, logprobs.WPO})
    assert AOTLoss(ld_alpha=1.0).needs == frozenset({logprobs.SHARED})
    for cls in REFERENCE_FREE:
        assert cls().needs == (frozenset({logprobs.WHOLE}) if cls is ORPOLoss else frozenset())


def test_combination_flags():
    assert Combination({"dpo": DPOLoss(), "simpo": SimPOLoss()}).requires_reference is True
    assert Combination({"simpo": SimPOLoss(), "sft": SFTLoss()}).requires_reference is False
    assert Combination({"dpo": DPOLoss(), "sft": SFTLoss()}).paired is True
    assert Combination({"kto": KTOLoss(), "sft": SFTLoss()}).paired is False
    combo = Combination({"kto": KTOLoss(), "dpo": DPOLoss(ld_alpha=0.5, wpo=True)})
    assert combo.needs == frozenset({logprobs.KL_ROWS, logprobs.SHARED, logprobs.WPO})


# --------------------------------------------------------------------------------------------
# Argument checks: one ValueError, one line per problem, each naming the parameter
# --------------------------------------------------------------------------------------------


def bad_values():
    cases = []
    for cls in TAKES_BETA:
        cases += [(cls, {"beta": 0.0}, "beta"), (cls, {"beta": -0.1}, "beta")]
    for cls in TAKES_LABEL_SMOOTHING:
        cases += [
            (cls, {"label_smoothing": -0.1}, "label_smoothing"),
            (cls, {"label_smoothing": 0.5}, "label_smoothing"),
        ]
    for cls in PAIRED:
        cases += [(cls, {"ld_alpha": -0.1}, "ld_alpha"), (cls, {"ld_alpha": 1.5}, "ld_alpha")]
    for cls in F_DIVERGENCE:
        cases.append((cls, {"f_divergence": "kl"}, "f_divergence"))
    cases += [
        (EXOPairLoss, {"epsilon": 0.0}, "epsilon"),
        (EXOPairLoss, {"epsilon": 1.0}, "epsilon"),
        (DiscoPOPLoss, {"tau": 0.0}, "tau"),
        (DiscoPOPLoss, {"tau": -0.05}, "tau"),
        (DPOPLoss, {"dpop_lambda": -1.0}, "dpop_lambda"),
        (RDPOLoss, {"alpha": -0.01}, "alpha"),
        (KTOLoss, {"desirable_weight": 0.0}, "desirable_weight"),
        (KTOLoss, {"undesirable_weight": -1.0}, "undesirable_weight"),
        (SimPOLoss, {"gamma": -0.5}, "gamma"),
        (SimPOLoss, {"nll_weight": -1.0}, "nll_weight"),
        (CPOLoss, {"nll_weight": -1.0}, "nll_weight"),
    ]
    return [pytest.param(*case, id=f"{case[0].__name__}-{case[1]}") for case in cases]


@pytest.mark.parametrize("cls, kwargs, name", bad_values())
def test_out_of_range_values_raise_naming_the_parameter(cls, kwargs, name):
    lines = problems(lambda: cls(**kwargs))
    assert len(lines) == 1
    value = next(iter(kwargs.values()))
    assert lines[0].startswith(f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}")


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (DPOLoss, {"label_smoothing": 0.0, "ld_alpha": 0.0}),
        (DPOLoss, {"label_smoothing": 0.49, "ld_alpha": 1.0}),
        (EXOPairLoss, {"epsilon": 0.5}),
        (DPOPLoss, {"dpop_lambda": 0.0}),
        (RDPOLoss, {"alpha": 0.0}),
        (SimPOLoss, {"gamma": 0.0, "nll_weight": 0.0}),
        (CPOLoss, {"nll_weight": 0.0}),
        (KTOLoss, {"desirable_weight": 1e-3, "undesirable_weight": 1e-3}),
    ],
)
def test_edge_values_are_allowed(cls, kwargs):
    cls(**kwargs)


@pytest.mark.parametrize(
    "make, names",
    [
        (
            lambda: DPOLoss(beta=0.0, label_smoothing=0.5, f_divergence="kl", ld_alpha=2.0),
            {"beta", "label_smoothing", "f_divergence", "ld_alpha"},
        ),
        (
            lambda: SimPOLoss(beta=-1.0, gamma=-1.0, label_smoothing=0.7, nll_weight=-1.0),
            {"beta", "gamma", "label_smoothing", "nll_weight"},
        ),
        (
            lambda: KTOLoss(beta=0.0, desirable_weight=0.0, undesirable_weight=0.0),
            {"beta", "desirable_weight", "undesirable_weight"},
        ),
        (lambda: EXOPairLoss(beta=-0.1, epsilon=1.0, ld_alpha=-1.0), {"beta", "epsilon", "ld_alpha"}),
        (lambda: DPOPLoss(beta=0.0, dpop_lambda=-1.0), {"beta", "dpop_lambda"}),
    ],
)
def test_several_problems_give_one_error_with_a_line_each(make, names):
    lines = problems(make)
    assert len(lines) == len(names)
    assert {line.split("=")[0] for line in lines} == names


def test_a_micro_batch_without_desirable_examples_gives_zero_not_nan():
    """Unpaired data: a micro batch may hold no desirable (CHOSEN) example. SFT has nothing to
    train on there: its loss is 0 with a graph, not the NaN of an empty mean, alone and in a
    combination with KTO."""
    empty = torch.zeros(0, dtype=F64, requires_grad=True)
    policy = SequenceLogps(
        {
            "chosen": RoleValues(empty, empty),
            "rejected": RoleValues(t(-3.0), t(2.0)),
            "kl": RoleValues(t(-4.0, -5.0), t(1.0, 1.0)),
        }
    )
    reference = SequenceLogps(
        {
            "chosen": RoleValues(empty.detach(), empty.detach()),
            "rejected": RoleValues(t(-2.0), t(2.0)),
            "kl": RoleValues(t(-4.0, -4.0), t(1.0, 1.0)),
        }
    )
    out = SFTLoss()(policy, None)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    combo = Combination({"kto": KTOLoss(), "sft": SFTLoss()})(policy, reference)
    assert math.isfinite(combo.loss.item())
    assert combo.metrics["loss/sft"].item() == 0.0
