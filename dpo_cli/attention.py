"""The attention keywords a batch's rows need on the model's attention back-end.

Padded rows need only their padding mask. Packed rows (see `data.collate`) must keep their
sequences apart and, under prompt sharing, the two responses apart while both see their
prompt; how that is said depends on the back-end:

- sdpa / eager: an explicit (R, 1, L, L) mask, boolean for sdpa, additive for eager, built from
  each token's segment, branch and position; position ids restart per sequence.
- flash_attention_2 / 3: no mask; transformers reads sequence starts from the restarting
  position ids (variable-length kernels).

Which layouts a model and back-end support is `layout.supported`'s question.
"""

from __future__ import annotations

from typing import Any

import torch

from dpo_cli.lmhead import inner_model

MASKED = ("sdpa", "eager")  # back-ends given an explicit 4D mask
VARLEN = ("flash_attention_2", "flash_attention_3")  # back-ends given restarting position ids only


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


def attention_inputs(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, Any]:
    """The attention keywords for a batch's rows: the padding mask for padded rows; for packed
    rows, restarting position ids and the mask `layout.supported` promises for the back-end."""
    if "segment" not in batch:
        return {"attention_mask": batch["attention_mask"]}
    config = inner_model(model).config
    position = batch["position_ids"]
    if attn_implementation(config) in VARLEN:
        return {"position_ids": position}
    segment, branch = batch["segment"], batch["branch"]
    length = segment.shape[1]
    q, k = (slice(None), slice(None), None), (slice(None), None, slice(None))  # (R, L, 1), (R, 1, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    allowed = causal & (segment[q] == segment[k]) & ((branch[k] == 0) | (branch[k] == branch[q]))
    window, _ = sliding_window(config)
    if window is not None:
        allowed &= position[q] - position[k] < window
    allowed |= torch.eye(length, dtype=torch.bool, device=segment.device)  # padding sees itself: no empty row
    mask = allowed[:, None]
    if attn_implementation(config) == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": position}
