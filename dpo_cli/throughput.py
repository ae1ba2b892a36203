"""What a logging window measures of training speed: tokens, examples and MFU per second of
training time."""

from __future__ import annotations

from typing import Any

import torch

from dpo_cli.logprobs import KL
from dpo_cli.reference import PrecomputedReference
from dpo_cli.scoring import Averages


def flops_per_token(parameters: int, reference: Any) -> tuple[float, float]:
    """The model FLOPs that `mfu` counts per token, (trained, forward only), N = the policy's
    parameters: a trained token costs 6N (the policy's forward and backward passes), a token of
    a forward-only row (KTO's KL rows, run without gradients) 2N; each adds 2N for a reference
    forward pass when a model runs one each step (not for precomputed log-probs or none).
    Attention's own FLOPs, which grow with the sequence length, are left out, as in the usual
    6N estimate."""
    live = 2.0 if reference is not None and not isinstance(reference, PrecomputedReference) else 0.0
    return (6.0 + live) * parameters, (2.0 + live) * parameters


class Window:
    """What the logging window accumulates over its logger.log_every steps: metric sums; token
    counts (`COUNTERS`); steps and the seconds spent training them (the steps alone: evaluation
    and checkpoints are not training time). It is saved in each checkpoint, so a run
    interrupted mid-window logs the same rows after resuming as it would have without the
    interruption.

    tokens: the trained sequences' own tokens, prompt counted once per response as any padded
        trainer computes it (KL rows, which are not trained on, excluded);
    computed: the tokens actually computed in rows with gradients (fewer when a prompt is shared);
    positions: all positions computed, padding included, in every row;
    forward: the tokens of forward-only rows (KTO's KL rows).
    """

    COUNTERS = ("tokens", "computed", "positions", "forward")

    def __init__(self, device: Any) -> None:
        self.metrics = Averages()
        self.counts = torch.zeros(len(self.COUNTERS), device=device)
        self.steps = 0
        self.seconds = 0.0

    def add_tokens(self, batch: dict[str, torch.Tensor]) -> None:
        mask = batch["attention_mask"]
        row_kl = batch["row_kl"].to(mask.device)
        per_row = mask.sum(-1)
        counts = [
            batch["length"][batch["role"] != KL].sum(),
            per_row[~row_kl].sum(),
            torch.tensor(mask.numel()),
            per_row[row_kl].sum(),
        ]
        self.counts += torch.stack([c.to(self.counts) for c in counts])

    def clear(self) -> None:
        self.metrics.clear()
        self.counts.zero_()
        self.steps, self.seconds = 0, 0.0

    def state(self) -> dict[str, Any]:
        parts = {k: [s.item(), c.item()] for k, (s, c) in self.metrics.parts.items()}
        counts = dict(zip(self.COUNTERS, self.counts.tolist(), strict=True))
        return {"parts": parts, **counts, "steps": self.steps, "seconds": self.seconds}

    def restore(self, state: dict[str, Any]) -> None:
        device = self.counts.device
        self.metrics.parts = {
            k: (torch.tensor(s, device=device), torch.tensor(c, device=device)) for k, (s, c) in state["parts"].items()
        }
        # Checkpoints of earlier versions lack "computed" (then equal to tokens), "positions"
        # and "forward".
        values = [state["tokens"], state.get("computed", state["tokens"]), state.get("positions", 0.0)]
        self.counts.copy_(torch.tensor([*values, state.get("forward", 0.0)]))
        self.steps = state["steps"]
        self.seconds = state.get("seconds", 0.0)

    def throughput(
        self, accelerator: Any, batch_size: int, unit: str, flops: tuple[float, float], peak: float | None
    ) -> dict[str, float]:
        """Examples (`pairs_per_s`, or `examples_per_s` for unpaired data) and trained sequence
        tokens per second of training time, over all processes; the share of computed positions
        that were padding; and MFU (over the tokens actually computed, each at its cost) when the
        peak is known."""
        tokens, computed, positions, forward = accelerator.reduce(self.counts.clone(), "sum").tolist()
        seconds = max(self.seconds, 1e-9)
        row = {
            "tokens_per_s": tokens / seconds,
            f"{unit}_per_s": batch_size * self.steps / seconds,
            "padding_share": 1 - (computed + forward) / positions if positions else 0.0,
        }
        if peak:
            done = flops[0] * computed + flops[1] * forward
            row["mfu"] = done / seconds / (peak * 1e12 * accelerator.num_processes)
        return row
