"""The reference model's log-probs.

Today the reference is a frozen copy of the policy taken before training starts, or nothing
when no loss term needs one. Other sources (a LoRA adapter switched off, a precomputed cache)
fit behind the same call: `reference(batch, extras) -> SequenceLogps`.
"""

from __future__ import annotations

import copy

import torch

from dpo_cli.logprobs import SequenceLogps, batch_logps


class FrozenReference:
    """A frozen copy of a model: eval mode (no dropout), no gradients, no optimizer state."""

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()

    def to(self, device: torch.device) -> FrozenReference:
        self.model.to(device)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> str:
        return f"frozen copy of the initial policy ({self.num_parameters() / 1e6:.2f}M parameters)"

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], extras: frozenset[str] = frozenset()) -> SequenceLogps:
        return batch_logps(self.model, batch, extras).logps


def build_reference(requires_reference: bool, policy: torch.nn.Module) -> FrozenReference | None:
    """The reference for a run: a frozen copy of `policy` when the loss needs one, else None,
    so that reference-free runs hold one model in memory, not two."""
    return FrozenReference(policy) if requires_reference else None
