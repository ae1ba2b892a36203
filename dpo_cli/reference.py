"""The reference model's log-probs.

Today the reference is a frozen copy of the policy taken before training starts. Other
sources (a LoRA adapter switched off, a precomputed cache, none) fit behind the same call:
`reference(batch) -> SequenceLogps`.
"""

from __future__ import annotations

import copy

import torch

from dpo_cli.logprobs import concatenated_forward
from dpo_cli.losses import SequenceLogps


class FrozenReference:
    """A frozen copy of a model: eval mode (no dropout), no gradients, no optimizer state."""

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()

    def to(self, device: torch.device) -> FrozenReference:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        return concatenated_forward(self.model, batch).logps
