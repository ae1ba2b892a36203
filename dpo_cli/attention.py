"""The attention keywords a batch's rows need on the model's attention back-end.

Padded rows need only their padding mask. Packed rows (see `data.collate`) must keep their
sequences apart and, under prompt sharing, the two responses apart while both see their
prompt; how that is said depends on the back-end:

- sdpa / eager: an explicit (R, 1, L, L) mask, boolean for sdpa, additive for eager, built from
  each token's segment, branch and position; position ids restart per sequence.
- flex_attention: a `BlockMask` from the same rule (`mask_rule`), so the kernel skips the
  blocks no query of a block may see (other sequences of a packed row, the other response,
  padding) instead of reading a dense L x L mask; built on the batch's device, for its lengths.
- flash_attention_2 / 3: no mask; transformers reads sequence starts from the restarting
  position ids (variable-length kernels).

One rule says which key each query sees (`mask_rule`): the dense masks and the block mask are
both made from it, so they cannot disagree. Which layouts a model and back-end support is
`layout.supported`'s question; `use_attention` switches a loaded model's back-end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from dpo_cli.lmhead import inner_model

MASKED = ("sdpa", "eager")  # back-ends given an explicit 4D mask
VARLEN = ("flash_attention_2", "flash_attention_3")  # back-ends given restarting position ids only
BLOCKWISE = ("flex_attention",)  # back-ends given a BlockMask (masked blocks skipped)


def attn_implementation(config: Any) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def sliding_window(config: Any) -> tuple[int | None, str]:
    """The sliding window every layer uses (None: full attention), or a reason no single mask fits."""
    types = set(getattr(config, "layer_types", None) or [])
    if len(types) > 1 or types - {"full_attention", "sliding_attention"}:
        return None, f"its layers mix attention kinds ({', '.join(sorted(types))})"
    if types == {"full_attention"}:
        return None, ""
    return getattr(config, "sliding_window", None), ""


def mask_rule(
    segment: torch.Tensor, branch: torch.Tensor, position: torch.Tensor, window: int | None
) -> Callable[..., torch.Tensor]:
    """Whether query q of row b may see key kv, as FlexAttention's `mask_mod(b, h, q, kv)`:
    causal, within its own sequence (`segment`), and under prompt sharing a response sees the
    prompt (branch 0) and itself only; within `window` positions for sliding-window models.
    Every position sees itself, so that a padding row is never empty. The arguments may be
    scalars (FlexAttention) or broadcasting index tensors (`dense_mask`)."""

    def allowed(b: Any, h: Any, q: Any, kv: Any) -> torch.Tensor:
        keep = (q >= kv) & (segment[b, q] == segment[b, kv]) & ((branch[b, kv] == 0) | (branch[b, kv] == branch[b, q]))
        if window is not None:  # q - kv < window, without an (R, L, L) tensor of differences
            keep = keep & (position[b, kv] > position[b, q] - window)
        return keep | (q == kv)

    return allowed


def dense_mask(segment: torch.Tensor, branch: torch.Tensor, position: torch.Tensor, window: int | None) -> torch.Tensor:
    """`mask_rule` for every (row, query, key): an (R, L, L) boolean tensor."""
    rows, length = segment.shape
    idx = torch.arange(length, device=segment.device)
    b = torch.arange(rows, device=segment.device)[:, None, None]
    return mask_rule(segment, branch, position, window)(b, None, idx[None, :, None], idx[None, None, :])


BLOCK = 128  # FlexAttention's block size: the kernel skips a query block x key block tile no query may see


def block_mask(segment: torch.Tensor, branch: torch.Tensor, position: torch.Tensor, window: int | None) -> Any:
    """`mask_rule` as FlexAttention's BlockMask (one per row, shared by the heads): per tile of
    BLOCK x BLOCK, whether no query sees any key (skipped), every query sees every key (computed
    without evaluating the rule) or some do (the rule applied inside). The tiles are read off the
    dense boolean mask (R x L^2 bytes, built once per batch) rather than from the rule under vmap,
    which would hold several int64 (R, L, L) intermediates at once."""
    from torch.nn.attention.flex_attention import BlockMask  # here: nothing GPU-side loads at start-up

    rows, length = segment.shape
    blocks = -(-length // BLOCK)
    dense = torch.zeros(rows, blocks * BLOCK, blocks * BLOCK, dtype=torch.bool, device=segment.device)
    dense[:, :length, :length] = dense_mask(segment, branch, position, window)
    tiles = dense.view(rows, blocks, BLOCK, blocks, BLOCK)
    full = tiles.all(4).all(2)  # (R, query blocks, key blocks)
    partial = tiles.any(4).any(2) & ~full

    def listed(tile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query block: how many key blocks are marked, and their indices first."""
        order = torch.argsort((~tile).to(torch.int8), dim=-1, stable=True)  # marked (0) first, in order
        return tile.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    (n_partial, partial_at), (n_full, full_at) = listed(partial), listed(full)
    rule = mask_rule(segment, branch, position, window)
    return BlockMask.from_kv_blocks(n_partial, partial_at, n_full, full_at, BLOCK, rule, seq_lengths=(length, length))


@contextmanager
def use_attention(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """Within: `model` runs on the attention back-end `implementation` (transformers'
    `set_attn_implementation`); its own back-end again after."""
    inner = inner_model(model)
    before = attn_implementation(inner.config)
    if implementation == before:
        yield
        return
    inner.set_attn_implementation(implementation)
    try:
        yield
    finally:
        inner.set_attn_implementation(before)


def generation_attention(model: torch.nn.Module) -> str:
    """The back-end `model` generates with: its own, except flex_attention (which dpo-cli picks
    for packed training rows) gives way to sdpa where the model has it; decoding one token at a
    time from a KV cache has no packed rows, and FlexAttention would build a block mask and may
    compile again as the cache grows."""
    inner = inner_model(model)
    own = attn_implementation(inner.config)
    if own in BLOCKWISE and getattr(type(inner), "_supports_sdpa", False):
        return "sdpa"
    return own


def attention_inputs(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, Any]:
    """The attention keywords for a batch's rows: the padding mask for padded rows; for packed
    rows, restarting position ids and the mask `layout.supported` promises for the back-end."""
    if "segment" not in batch:
        return {"attention_mask": batch["attention_mask"]}
    config = inner_model(model).config
    position = batch["position_ids"]
    if attn_implementation(config) in VARLEN:
        return {"position_ids": position}
    window, _ = sliding_window(config)
    if attn_implementation(config) in BLOCKWISE:
        return {
            "attention_mask": block_mask(batch["segment"], batch["branch"], position, window),
            "position_ids": position,
        }
    mask = dense_mask(batch["segment"], batch["branch"], position, window)[:, None]
    if attn_implementation(config) == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": position}
