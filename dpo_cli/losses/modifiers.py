"""Modifiers: changes applied around a loss, declared once and accepted by the losses that list
them in `accepts` (`paired.PairedLoss` and its subclasses).

A modifier's keys are its constructor's parameters; every loss that accepts it takes them as
its own (`loss.ld_alpha`, `loss.wpo`, `loss.f_divergence`, `loss.f_alpha`, also inside a
combination: `loss.terms.dpo.wpo`), and its config schema gains them (`losses.options`). A
modifier acts at one or more of three places of a paired loss's computation (in `accepts`
order), and changes nothing at its default (off):

    inputs(values) -> values      the log-probs the loss reads, of policy and reference alike
    margin(h) -> s(h)             the log-ratios h the loss's score difference is built on
    outputs(losses, policy)       the per-pair losses (B,), before their mean

    LengthDesensitized (ld_alpha)         inputs: LD-DPO
    PairWeights (wpo)                     outputs: WPO
    FDivergence (f_divergence, f_alpha)   margin: the f-divergence to the reference
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
import torch.nn.functional as F

from dpo_cli.batch import SHARED, WPO
from dpo_cli.logprobs import SequenceLogps

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class Modifier:
    """Base of the modifiers: identity at each place; `needs` are the per-sequence values it
    reads (`batch.SHARED`, `batch.WPO`), only while it is on."""

    needs: frozenset[str] = frozenset()

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Its config keys: the constructor's parameters."""
        return tuple(n for n in inspect.signature(cls).parameters if n != "self")

    def problems(self) -> list[str]:
        """One line per key out of range ("key=value must ..."), as the losses' own checks."""
        return []

    def inputs(self, values: SequenceLogps) -> SequenceLogps:
        return values

    def margin(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def outputs(self, losses: torch.Tensor, policy: SequenceLogps) -> torch.Tensor:
        return losses

    def __repr__(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self.keys())


class LengthDesensitized(Modifier):
    """LD-DPO (Liu et al., 2024, Eq. 8): the summed log-probs of policy and reference become

        pi = pi[first min(|y_w|, |y_l|) tokens] + ld_alpha * pi[remaining tokens]

    so the longer response's surplus tokens count ld_alpha-fold (`shared` values: the first
    `shared_tokens` response tokens of each pair). `logps/*` then log these, as TRL does.

    Keys:
        ld_alpha: weight in [0, 1] of the response tokens past the shorter response; None =
            off (equal to 1.0); 0 = only the shared length counts.
    """

    def __init__(self, ld_alpha: float | None = None):
        self.given = ld_alpha  # as the user wrote it, for the message
        self.ld_alpha = None if ld_alpha is None else float(ld_alpha)
        self.needs = frozenset({SHARED}) if ld_alpha is not None else frozenset()

    def problems(self) -> list[str]:
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            return [f"ld_alpha={self.given} must be in [0, 1] (1 = plain DPO, 0 = only the shared length counts)"]
        return []

    def inputs(self, values: SequenceLogps) -> SequenceLogps:
        if self.ld_alpha is None:
            return values
        weighted = {}
        for role in ("chosen", "rejected"):
            v = values[role]
            assert v.shared is not None, "ld_alpha needs shared log-probs (batch.SHARED)"
            weighted[role] = dataclasses.replace(v, logps=v.shared + self.ld_alpha * (v.logps - v.shared))
        return values.replace(**weighted)


class PairWeights(Modifier):
    """WPO (Zhou et al., 2024, Eq. 2): each pair's loss is multiplied by the detached weight

        w = exp(mean_t [log p(y_w,t) - log sum_v p(v)^2]) * (the same for y_l)

    under the policy (`wpo` values, per-token means over response tokens).

    Keys:
        wpo: weight each pair by its responses' length-normalised, aligned probabilities
            under the policy (False = off).
    """

    def __init__(self, wpo: bool = False):
        self.wpo = bool(wpo)
        self.needs = frozenset({WPO}) if wpo else frozenset()

    def outputs(self, losses: torch.Tensor, policy: SequenceLogps) -> torch.Tensor:
        if not self.wpo:
            return losses
        chosen, rejected = policy["chosen"].wpo, policy["rejected"].wpo
        assert chosen is not None and rejected is not None, "wpo needs WPO values (batch.WPO)"
        return losses * torch.exp(chosen) * torch.exp(rejected)


class FDivergence(Modifier):
    """An f-divergence to the reference instead of the reverse KL (Wang et al., 2023, "Beyond
    Reverse KL"): each log-ratio h is replaced by s(h) = f'(exp(h)) before the loss takes its
    score difference s(h_w) - s(h_l):

        reverse_kl        h (DPO)
        forward_kl        1 - exp(-h)
        js_divergence     log 2 + log sigmoid(h)
        alpha_divergence  (exp((f_alpha - 1) h) - 1) / (f_alpha - 1)

    The rewards stay beta * h. `f_alpha` follows TRL's `f_alpha_divergence_coef` convention (its
    code): f_alpha = 1 gives reverse KL and 0 forward KL, so it is 1 minus the paper's alpha
    (whose f'(u) = (1 - u^-alpha) / alpha); the two agree at the default 0.5.

    Keys:
        f_divergence: reverse_kl (standard), forward_kl, js_divergence or alpha_divergence.
        f_alpha: alpha of alpha_divergence (unused otherwise); 1.0 equals reverse_kl.
    """

    def __init__(self, f_divergence: str = "reverse_kl", f_alpha: float = 0.5):
        self.f_divergence = f_divergence
        self.f_alpha = float(f_alpha)

    def problems(self) -> list[str]:
        if self.f_divergence not in F_DIVERGENCES:
            return [f"f_divergence={self.f_divergence!r} is not one of {', '.join(F_DIVERGENCES)}"]
        return []

    def margin(self, h: torch.Tensor) -> torch.Tensor:
        if self.f_divergence == "forward_kl":
            return 1 - torch.exp(-h)
        if self.f_divergence == "js_divergence":
            return math.log(2) + F.logsigmoid(h)
        if self.f_divergence == "alpha_divergence" and abs(self.f_alpha - 1) > 1e-6:
            # Clamped as TRL does, so that exp stays finite in float32.
            t = torch.clamp((self.f_alpha - 1) * h, max=80.0)
            return (torch.exp(t) - 1) / (self.f_alpha - 1)
        return h  # reverse_kl, and alpha_divergence's limit at alpha = 1
