"""The LM head on the scored positions only, in chunks: log-probs without the (N, T, V) logits.

A causal LM's last step turns each position's hidden state h into logits h W^T (+ b) over the
vocabulary. A plain forward does that for every position of every row and keeps the float32
logits, their log-softmax and, in backward, its gradient: three (N, T, V) tensors, the largest
in a DPO step (8 x 512 x 49152 x 4 bytes = 0.8 GB each for SmolLM2 at batch 4). Here the head
runs only on the positions that predict a scored token, `chunk` positions at a time; forward
keeps one float32 log-sum-exp per position, and backward recomputes each chunk's logits to
form its gradient. Peak memory of this stage is then chunk x V, whatever the length, batch or
vocabulary, and the positions that predict nothing scored (prompt, padding) cost no head at all.

`Head.find(model)` says whether a model's logits are exactly `lm_head(last hidden state)`, so
that this path computes what the model computes; a model that scales or soft-caps its logits
(Gemma-2, Cohere, Granite), or whose head is not a plain Linear (a LoRA-wrapped head, a
sharded one), keeps the full-logits path, and `layout.probe` checks the two against each other
on real data at the start of a run. A head in model.lora.modules_to_save (peft's wrapper of a
Linear and its trained copy, whose weight follows the adapter's state) counts as plain.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

# Config attributes by which some architectures transform `lm_head(h)` into their logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the plain forward's head matmul runs in: autocast's when it is on, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _cast(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias in the matmul's dtype, cast once in forward and once in
    backward rather than once per chunk (a float32 master weight under bf16 autocast: one V x H
    bf16 copy at a time, as autocast's own cast cache keeps for the plain head)."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 logits of a chunk, the matmul in the (already cast) weight's dtype: bf16 on
    tensor cores under bf16 autocast, as the plain head; log-softmax and gather then run on the
    float32 result."""
    logits = h.to(weight.dtype) @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


class _ChunkedLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] per position, (M,) float32, chunk by chunk.

    Backward: d logp / d logits = onehot(target) - softmax, recomputed per chunk from the saved
    log-sum-exp; its products with W and h give the gradients of h, W and b.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk, dtype):  # type: ignore[override]
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = _cast(weight, bias, dtype)
            logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(logps)
            for s in range(0, hidden.shape[0], chunk):
                logits = _chunk_logits(hidden[s : s + chunk], w, b)
                lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
                logps[s : s + chunk] = logits.gather(1, target[s : s + chunk, None]).squeeze(1) - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return logps

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        hidden, weight, bias, target, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = ctx.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = _cast(weight, bias, dtype)
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s : s + ctx.chunk]
                g = grad[s : s + ctx.chunk].float()
                # softmax, in place on the recomputed logits (no second chunk-sized buffer)
                probs = _chunk_logits(h, w, b).sub_(lse[s : s + ctx.chunk, None]).exp_()
                d_logits = probs.mul_(-g[:, None])
                d_logits.scatter_add_(1, target[s : s + ctx.chunk, None], g[:, None])
                if need_h:
                    grad_h[s : s + ctx.chunk] = (d_logits.to(dtype) @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (d_logits.to(dtype).t() @ h.to(dtype)).float()
                if need_b:
                    grad_b += d_logits.sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def chunked_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Log-prob of `target` (M,) at each of `hidden`'s (M, H) positions under the head (W, b),
    float32, differentiable in hidden, W and b; never more than `chunk` x V logits at a time."""
    return _ChunkedLogps.apply(hidden, weight, bias, target, chunk, _compute_dtype(weight))


@torch.no_grad()
def position_stats(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int, wpo: bool
) -> dict[str, torch.Tensor]:
    """Per position, without gradients: the mean logit over the vocabulary ("mean_logit",
    h . mean(W) + mean(b): exact, no logits needed) and, with `wpo`, log sum_v p(v)^2 ("log_sum_sq",
    WPO's alignment term), chunk by chunk."""
    dtype = _compute_dtype(weight)
    w, b = _cast(weight, bias, dtype)
    mean_w = w.float().mean(0)
    out = {"mean_logit": hidden.to(dtype).float() @ mean_w + (bias.float().mean() if bias is not None else 0.0)}
    if wpo:
        values = []
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                logits = _chunk_logits(hidden[s : s + chunk], w, b)
                values.append(torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1))
        out["log_sum_sq"] = torch.cat(values) if values else hidden.new_zeros(0, dtype=torch.float32)
    return out


def inner_model(model: torch.nn.Module) -> Any:
    """The transformers model under DDP / DeepSpeed's wrapper and peft's."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _original(module: Any) -> Any:
    """A head trained whole under LoRA (model.lora.modules_to_save=[lm_head]) is peft's
    ModulesToSaveWrapper around the original Linear and its trainable copy; its `weight` and
    `bias` are the copy's while the adapter is on and the original's while it is off (the
    adapter-disabled reference), as its own forward would use. Any other module is itself."""
    if type(module).__name__ == "ModulesToSaveWrapper":
        return module.original_module
    return module


@dataclass
class Head:
    """Where a model's last hidden state comes from (`backbone`'s output 0) and the Linear
    that turns it into logits."""

    backbone: torch.nn.Module
    linear: torch.nn.Module  # a Linear, or peft's ModulesToSaveWrapper of one (see `_original`)
    chunk: int

    @staticmethod
    def find(model: torch.nn.Module, chunk: int) -> tuple[Head | None, str]:
        """The model's head, or None and why the full-logits path is used instead."""
        inner = inner_model(model)
        config = getattr(inner, "config", None)
        transforms = [a for a in LOGIT_TRANSFORMS if getattr(config, a, None) not in (None, 1, 1.0)]
        if transforms:
            return None, f"{type(inner).__name__} transforms its logits ({', '.join(transforms)})"
        linear = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if type(_original(linear)) is not torch.nn.Linear:
            return None, f"its output layer is a {type(linear).__name__}, not a plain Linear"
        if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
            return None, f"{type(inner).__name__}.forward takes no logits_to_keep"
        try:  # the module whose output 0 is the state the head reads (OPT: model.decoder)
            backbone = inner.get_decoder()
        except (AttributeError, ValueError):
            backbone = None
        if not isinstance(backbone, torch.nn.Module) or backbone is inner:
            return None, f"{type(inner).__name__} has no separate decoder module"
        return Head(backbone, linear, chunk), ""

    @contextmanager
    def capture(self):
        """Within: `hidden()` returns the backbone's last hidden state of the latest forward."""
        store: dict[str, torch.Tensor] = {}

        def hook(_module, _args, output):
            store["h"] = output[0]  # last_hidden_state, of a ModelOutput or a tuple

        handle = self.backbone.register_forward_hook(hook)
        try:
            yield lambda: store["h"]
        finally:
            handle.remove()
