"""Which layout a run uses, the attention inputs it needs, and a check that it is exact.

`train.layout` names how sequences sit in the model's rows (see `data.collate`): padded,
packed, or shared (packed, with one prompt per pair). Packed rows need attention that keeps
sequences apart and, under prompt sharing, keeps the two responses apart while both see their
prompt. The back-end decides how that is said:

- sdpa / eager (the CPU default, and any GPU): an explicit (R, 1, L, L) mask, boolean for
  sdpa, additive for eager, built from each token's segment, branch and position; position
  ids restart per sequence. Exact for every layout.
- flash_attention_2 / 3: no mask; transformers reads sequence starts from the restarting
  position ids (variable-length kernels). Packing works; prompt sharing cannot be said this
  way, so `auto` picks `packed`.
- anything else (flex_attention, a custom kernel), and models mixing sliding-window and
  full-attention layers (one mask cannot serve both): padded, with the model's own masks.

`auto` takes the first of shared, packed, padded that the back-end supports. Before training,
`probe` runs a few real examples through the chosen layout and LM-head path and through the
plain padded one, and falls back (with a warning) if they disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from dpo_cli.errors import ConfigError
from dpo_cli.lmhead import Head, inner_model

log = logging.getLogger(__name__)

MASKED = ("sdpa", "eager")  # back-ends given an explicit 4D mask
VARLEN = ("flash_attention_2", "flash_attention_3")  # back-ends given restarting position ids only


def attn_implementation(config: Any) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def _window(config: Any) -> tuple[int | None, str]:
    """The sliding window every layer uses (None: full attention), or a reason no single mask fits."""
    types = set(getattr(config, "layer_types", None) or [])
    if len(types) > 1 or types - {"full_attention", "sliding_attention"}:
        return None, f"its layers mix attention kinds ({', '.join(sorted(types))})"
    if types == {"full_attention"}:
        return None, ""
    return getattr(config, "sliding_window", None), ""


def supported(config: Any) -> tuple[tuple[str, ...], str]:
    """The layouts this model's attention back-end supports, best first, and why not more."""
    _, mixed = _window(config)
    impl = attn_implementation(config)
    if mixed:
        return ("padded",), mixed
    if impl in MASKED:
        return ("shared", "packed", "padded"), f"{impl} attention takes an explicit mask"
    if impl in VARLEN:
        return (
            "packed",
            "padded",
        ), f"{impl} reads packed sequences from position ids but takes no mask for prompt sharing"
    return ("padded",), f"{impl} attention is given no packed-sequence mask by dpo-cli"


@dataclass
class Choice:
    layout: str
    head: Head | None  # None: the full-logits path
    why: str

    def describe(self) -> str:
        head = f"chunked LM head on scored positions ({self.head.chunk} per chunk)" if self.head else "full logits"
        return f"layout {self.layout}, {head}: {self.why}"


def choose(requested: str, chunk: int | None, model: torch.nn.Module, sharded: bool) -> Choice:
    """The layout and head path for `train.layout` and `train.logits_chunk` on this model, or a
    ConfigError when an explicitly requested layout cannot run here."""
    config = inner_model(model).config
    layouts, why = supported(config)
    if requested == "auto":
        layout = layouts[0]
    elif requested in layouts:
        layout, why = requested, f"train.layout={requested}"
    else:
        raise ConfigError(
            [
                f"train.layout={requested}: not possible with this model ({why}); use one of "
                f"{', '.join(layouts)} or auto, or model.attn_implementation=sdpa"
            ]
        )
    reasons = [f"{why}; back-end {attn_implementation(config)}"]
    head = None
    if chunk is None:
        reasons.append("train.logits_chunk=null")
    elif sharded:
        reasons.append("sharded weights (FSDP/ZeRO-3): the head's weight is only whole inside its own forward")
    else:
        head, no = Head.find(model, chunk)
        if head is None:
            reasons.append(no)
    return Choice(layout, head, "; ".join(reasons))


def check_reference(layout: str, model: torch.nn.Module) -> None:
    """A separate reference model scores the policy's batches: it must support their layout."""
    layouts, why = supported(inner_model(model).config)
    if layout not in layouts:
        raise ConfigError(
            [f"train.layout: the reference model cannot score {layout} batches ({why}); set train.layout=padded"]
        )


def attention_inputs(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, Any]:
    """The attention keywords for a batch's rows: the padding mask for padded rows; for packed
    rows, restarting position ids and the mask `supported` promises for the back-end."""
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
    window, _ = _window(config)
    if window is not None:
        allowed &= position[q] - position[k] < window
    allowed |= torch.eye(length, dtype=torch.bool, device=segment.device)  # padding sees itself: no empty row
    mask = allowed[:, None]
    if attn_implementation(config) == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": position}


def _tolerance(dtype: torch.dtype, tokens: torch.Tensor) -> torch.Tensor:
    """How far two exact computations of a summed log-prob may drift apart by rounding alone
    (a wrong mask or head is off by whole nats)."""
    per_token = 2e-5 if dtype == torch.float32 else 2e-2
    return 1e-4 + per_token * tokens.clamp(min=1)


@torch.no_grad()
def probe(choice: Choice, model: torch.nn.Module, examples: list, pad_id: int, needs_kl: bool) -> Choice:
    """Score a few real examples with `choice` and with padded full logits; keep `choice` if
    they agree within rounding, else fall back (with a warning) to the best that agrees."""
    from dpo_cli.data.collate import collate
    from dpo_cli.logprobs import batch_logps

    candidates = [(choice.layout, choice.head), ("padded", choice.head), (choice.layout, None)]
    candidates = [c for i, c in enumerate(candidates) if c not in candidates[:i] and c != ("padded", None)]
    if not candidates or not examples:
        return choice
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device

        def score(layout: str, head: Head | None) -> tuple[torch.Tensor, torch.Tensor]:
            batch = collate(examples, pad_id, kl=needs_kl, layout=layout)
            batch = {k: v.to(device) for k, v in batch.items()}
            lp = batch_logps(model, batch, head=head).logps
            return torch.cat([lp.chosen, lp.rejected]), torch.cat([lp.chosen_tokens, lp.rejected_tokens])

        plain, tokens = score("padded", None)
        tolerance = _tolerance(next(model.parameters()).dtype, tokens)
        for layout, head in candidates:
            diffs = (score(layout, head)[0] - plain).abs()
            diff = float(diffs.max())
            if bool((diffs <= tolerance).all()):
                if (layout, head) == candidates[0]:
                    log.info("start-up check: %s within %.2g of padded full logits", choice.describe(), diff)
                    return choice
                log.warning(
                    "%s disagreed with padded full logits on real examples; using %s", choice.describe(), layout
                )
                return Choice(layout, head, choice.why + "; the start-up check rejected the faster path")
            log.warning("start-up check: layout %s, head %s off by %.3g nats", layout, bool(head), diff)
        log.warning("%s disagreed with padded full logits on real examples; using those", choice.describe())
        return Choice("padded", None, choice.why + "; the start-up check rejected the faster paths")
    finally:
        model.train(was_training)
