"""A weighted sum of loss terms in one run (RPO = DPO + NLL, MPO = sigmoid + BCO + SFT, ...)."""

from __future__ import annotations

from collections.abc import Mapping

from dpo_cli.logprobs import SequenceLogps
from dpo_cli.losses.base import Loss, LossOutput, Reduce, local, raise_problems


def check_weights(terms: list[str], weights: Mapping[str, object]) -> list[str]:
    """Problems with a combination's weights: each names a term and is a number >= 0."""
    problems = []
    for name, w in weights.items():
        if name not in terms:
            problems.append(f"weights.{name}={w} names no term; the terms are: {', '.join(terms) or 'none'}")
        elif isinstance(w, bool) or not (isinstance(w, (int, float)) and w >= 0):
            problems.append(f"weights.{name}={w!r} must be a number >= 0")
    return problems


class Combination(Loss):
    """loss = sum_k weight_k * loss_k, over named terms, each any single loss.

    Each term computes its own batch loss (its own reduction and log-prob normalisation), then
    the weighted sum is taken; weights default to 1.0. Reference-based and reference-free terms
    mix freely: a reference is built when any term needs one. Metrics: `loss/<term>` for each
    term's (unweighted) loss beside the total `loss`, and each term's own metrics (a name two
    terms share is prefixed with the term: `<term>/<metric>`). `rewards/*` and `logps/*` are
    those of the first term, so list the term whose rewards you want to watch first.

    In YAML (conf/loss/rpo.yaml) the terms are other conf/loss files placed under `terms`:

        defaults:
          - /loss@terms.dpo: dpo
          - /loss@terms.sft: sft
          - _self_
        _target_: dpo_cli.losses.Combination
        weights: {dpo: 1.0, sft: 1.0}

    and on the command line: `loss=combo +loss@loss.terms.dpo=dpo +loss@loss.terms.sft=sft
    +loss.weights.sft=0.5`, or change a recipe: `loss=rpo loss.weights.sft=0.5
    loss.terms.dpo.beta=0.05`.

    Keys:
        terms: name -> a conf/loss file (a loss), added with +loss@loss.terms.NAME=FILE;
            metrics loss/NAME per term.
        weights: name -> weight >= 0 (1.0 for terms not listed); add with +loss.weights.NAME=W.
    """

    def __init__(self, terms: Mapping[str, Loss], weights: Mapping[str, float] | None = None):
        terms = dict(terms or {})
        weights = dict(weights or {})
        problems = []
        if not terms:
            problems.append("terms is empty: add terms with +loss@loss.terms.NAME=LOSS (e.g. +loss@loss.terms.dpo=dpo)")
        for name, term in terms.items():
            if isinstance(term, Combination):
                problems.append(f"terms.{name} is itself a combination; list its terms here instead")
            elif not isinstance(term, Loss):
                problems.append(
                    f"terms.{name} is not a loss (a conf/loss file placed with +loss@loss.terms.{name}=NAME)"
                )
        problems += check_weights(list(terms), weights)
        raise_problems(problems)
        self.terms = terms
        self.weights = {name: float(weights.get(name, 1.0)) for name in terms}
        self.requires_reference = any(t.requires_reference for t in terms.values())
        self.paired = any(t.paired for t in terms.values())
        self.needs = frozenset().union(*(t.needs for t in terms.values()))

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        outs = {
            name: term(policy, reference if term.requires_reference else None, reduce)
            for name, term in self.terms.items()
        }
        total = sum(self.weights[name] * out.loss for name, out in outs.items())
        metrics = {f"loss/{name}": out.loss.detach() for name, out in outs.items()}
        shared = [k for name, out in outs.items() for k in out.metrics]
        for name, out in outs.items():
            for k, v in out.metrics.items():
                metrics[k if shared.count(k) == 1 else f"{name}/{k}"] = v
        first = next(iter(outs.values()))
        return LossOutput(
            total, first.chosen_rewards, first.rejected_rewards, metrics, None, first.chosen_logps, first.rejected_logps
        )

    def __repr__(self) -> str:
        parts = " + ".join(f"{self.weights[n]} * {n}={t!r}" for n, t in self.terms.items())
        return f"Combination({parts})"
