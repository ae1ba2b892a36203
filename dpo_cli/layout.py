"""Which layout a run uses, which layouts a model supports, and a check that it is exact.

`train.layout` names how sequences sit in the model's rows (see `data.collate`): padded,
packed, or shared (packed, with one prompt per pair). Packed rows need attention that keeps
sequences apart and, under prompt sharing, keeps the two responses apart while both see their
prompt. The back-end decides how that is said (`attention.attention_inputs` says it):

- sdpa / eager (the CPU default, and any GPU): an explicit (R, 1, L, L) mask, boolean for
  sdpa, additive for eager, built from each token's segment, branch and position; position
  ids restart per sequence. Exact for every layout.
- flex_attention: a FlexAttention `BlockMask` from the same rule, so masked blocks are
  skipped. Exact for every layout.
- flash_attention_2 / 3: no mask; transformers reads sequence starts from the restarting
  position ids (variable-length kernels). Packing works; prompt sharing cannot be said this
  way, so `auto` picks `packed`.
- anything else (a custom kernel): padded, with the model's own masks.

Some models rule layouts out whatever the back-end: padded only for those mixing
sliding-window and full-attention layers (one mask cannot serve both), and for those whose
positions cannot restart per sequence (no `position_ids` argument: Bloom, MPT, state-space
models; ALiBi biases computed from the row: Falcon with alibi=True); no prompt sharing for
GPT-Neo's local layers, which apply their window by column inside the layer.

`auto` takes the first of shared, packed, padded that the model and back-end support. On a
CUDA device, with model.attn_implementation left null, packed and shared rows run on
flex_attention where the model supports it (a dense (R, 1, L, L) mask sends sdpa to its
slower masked kernel and costs L^2 memory per row); the model is switched to it in place
(`apply`). Before training, `probe` runs a few real examples (the longest, the shortest and two between) through
the chosen layout and LM-head path and through the plain padded one, compares the log-probs,
the extras the loss asks for and the gradient of one micro batch, and falls back (with a
warning) if they disagree or the faster path fails.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from dpo_cli.attention import BLOCKWISE, MASKED, VARLEN, attn_implementation, sliding_window, use_attention
from dpo_cli.attention import attention_inputs as attention_inputs  # re-exported: callers know it here
from dpo_cli.batch import CHOSEN, KL_ROWS, REJECTED, ROLE_NAMES, SHARED, WHOLE, WPO
from dpo_cli.data.collate import collate
from dpo_cli.data.tokenize import Tokenized, example_length
from dpo_cli.errors import ConfigError
from dpo_cli.lmhead import Head, inner_model
from dpo_cli.logprobs import SequenceLogps, batch_logps

log = logging.getLogger(__name__)

ALL_LAYOUTS = ("shared", "packed", "padded")  # best first
# A path a batch can take: its layout, the chunked head (None: full logits), and the attention
# back-end (None: the model's own). PLAIN is the one every other is checked against.
BatchPath = tuple[str, Head | None, str | None]
PLAIN: BatchPath = ("padded", None, None)
ALIBI_FLAGS = ("alibi", "use_alibi")  # config attributes by which a model says it uses ALiBi


def _alibi(config: Any) -> bool:
    sections = (config, getattr(config, "attn_config", None))  # MPT keeps its flag in attn_config
    return any(getattr(c, flag, False) is True for c in sections for flag in ALIBI_FLAGS) or (
        getattr(config, "position_embedding_type", None) == "alibi"
    )


def _structure(inner: Any) -> tuple[tuple[str, ...], str]:
    """The layouts the model's own structure allows, whatever the attention back-end, and why
    not more ("" when all)."""
    config, name = inner.config, type(inner).__name__
    _, mixed = sliding_window(config)
    if mixed:
        return ("padded",), mixed
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        return ("padded",), f"{name} takes no position ids, so positions cannot restart per packed sequence"
    if _alibi(config):
        return ("padded",), (
            f"{name} uses ALiBi, whose position biases come from each row's padding mask, not from position ids"
        )
    if "local" in (getattr(config, "attention_layers", None) or []):
        return ("packed", "padded"), (
            f"{name}'s local-attention layers apply their window by column, which prompt sharing's positions do not follow"
        )
    return ALL_LAYOUTS, ""


def supported(model: torch.nn.Module) -> tuple[tuple[str, ...], str]:
    """The layouts this model and its attention back-end support, best first, and why not more."""
    inner = inner_model(model)
    impl = attn_implementation(inner.config)
    structural, because = _structure(inner)
    if impl in MASKED:
        backend, why = ALL_LAYOUTS, f"{impl} attention takes an explicit mask"
    elif impl in BLOCKWISE:
        backend, why = ALL_LAYOUTS, f"{impl} takes a block mask"
    elif impl in VARLEN:
        backend = ("packed", "padded")
        why = f"{impl} reads packed sequences from position ids but takes no mask for prompt sharing"
    else:
        backend, why = ("padded",), f"{impl} attention is given no packed-sequence mask by dpo-cli"
    layouts = tuple(layout for layout in backend if layout in structural)
    return layouts, because if layouts != backend else why


def _refusal(requested: str, model: torch.nn.Module) -> str:
    """Why `requested` cannot run on this model, and only fixes that work: the layouts it
    supports, and another attention back-end only where the back-end is what stands in the way."""
    inner = inner_model(model)
    layouts, why = supported(model)
    structural, because = _structure(inner)
    fixes = " or ".join(f"train.layout={layout}" for layout in (*layouts, "auto"))
    if requested not in structural:
        return f"train.layout={requested}: not possible with this model ({because}); use {fixes}"
    masked = "sdpa" if getattr(type(inner), "_supports_sdpa", False) else "eager"
    return f"train.layout={requested}: not possible with this model ({why}); use {fixes}, or model.attn_implementation={masked}"


@dataclass
class Choice:
    layout: str
    head: Head | None  # None: the full-logits path
    why: str
    sharded: bool = False  # weights sharded across processes (FSDP/ZeRO-3): no gradient check at start
    attention: str | None = None  # the back-end batches run on (None: the model's own, unchanged)

    def describe(self) -> str:
        head = f"chunked LM head on scored positions ({self.head.chunk} per chunk)" if self.head else "full logits"
        on = f" on {self.attention}" if self.attention else ""
        return f"layout {self.layout}{on}, {head}: {self.why}"


def _runs_flex(inner: Any) -> bool:
    """Whether a (transformers) model can be switched to flex_attention once loaded."""
    return bool(getattr(type(inner), "_supports_flex_attn", False)) and hasattr(inner, "set_attn_implementation")


def _flex_problem(model: torch.nn.Module, layout: str, cuda: bool) -> str | None:
    """Why packed or shared rows would not run on flex_attention here (None: they would)."""
    inner = inner_model(model)
    config, name = inner.config, type(inner).__name__
    if not cuda:
        return "not on CUDA"
    if layout == "padded":
        return "padded rows need no packed-sequence mask"
    if attn_implementation(config) not in MASKED:
        return f"the model runs {attn_implementation(config)}"
    if not _runs_flex(inner):
        return f"{name} does not support flex_attention"
    if getattr(config, "attention_dropout", 0.0) or getattr(config, "attn_pdrop", 0.0):
        return "its attention dropout is on (flex_attention has none)"
    return None


def choose(
    requested: str,
    chunk: int | None,
    model: torch.nn.Module,
    sharded: bool,
    auto_attention: bool = False,
    cuda: bool | None = None,
) -> Choice:
    """The layout, head path and attention back-end for `train.layout` and `train.logits_chunk`
    on this model, or a ConfigError when an explicitly requested layout cannot run here.
    `auto_attention`: model.attn_implementation is null, so packed and shared rows may move to
    flex_attention on CUDA (`cuda`: where the model will run; None: where its weights are)."""
    config = inner_model(model).config
    layouts, why = supported(model)
    if requested == "auto":
        layout = layouts[0]
    elif requested in layouts:
        layout, why = requested, f"train.layout={requested}"
    else:
        raise ConfigError([_refusal(requested, model)])
    reasons = [f"{why}; back-end {attn_implementation(config)}"]
    attention = None
    if auto_attention:
        on_cuda = next(model.parameters()).device.type == "cuda" if cuda is None else cuda
        problem = _flex_problem(model, layout, on_cuda)
        if problem is None:
            attention = BLOCKWISE[0]
            reasons.append(f"{BLOCKWISE[0]} for {layout} rows on CUDA (masked blocks skipped)")
        elif on_cuda and layout != "padded":
            reasons.append(f"no flex_attention: {problem}")
    head = None
    if chunk is None:
        reasons.append("train.logits_chunk=null")
    elif sharded:
        reasons.append("sharded weights (FSDP/ZeRO-3): the head's weight is only whole inside its own forward")
    else:
        head, no = Head.find(model, chunk)
        if head is None:
            reasons.append(no)
    return Choice(layout, head, "; ".join(reasons), sharded, attention)


def apply(choice: Choice, model: torch.nn.Module) -> None:
    """Put `model` (the policy, or a reference scoring its batches) on the choice's attention
    back-end, where it differs from the model's own and the model supports it; a model that does
    not keeps its own, which scores the same batches exactly (its own mask, `attention_inputs`)."""
    inner = inner_model(model)
    if choice.attention is None or attn_implementation(inner.config) == choice.attention:
        return
    if _runs_flex(inner):
        inner.set_attn_implementation(choice.attention)
        log.info("attention: %s for %s (%s)", choice.attention, type(inner).__name__, choice.describe())


def check_reference(layout: str, model: torch.nn.Module) -> None:
    """A separate reference model scores the policy's batches: it must support their layout."""
    layouts, why = supported(model)
    if layout not in layouts:
        raise ConfigError(
            [f"train.layout: the reference model cannot score {layout} batches ({why}); set train.layout=padded"]
        )


# The examples the start-up check scores, as fractions of the way from the longest to the
# shortest: the longest (where a length-dependent fault shows first), two between, the shortest.
PROBE_SPREAD = (0.0, 1 / 3, 2 / 3, 1.0)
# How far the gradient of one micro batch may drift from the plain path's by rounding alone,
# relative to its norm (a wrong mask, head or backward is off by a sizable fraction).
GRADIENT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_GRADIENT_TOLERANCE = 5e-2  # bfloat16 / float16 weights (and gradients)


def _tolerance(dtype: torch.dtype, tokens: torch.Tensor) -> torch.Tensor:
    """How far two exact computations of a summed log-prob may drift apart by rounding alone
    (a wrong mask or head is off by whole nats)."""
    per_token = 2e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    return 1e-4 + per_token * tokens.clamp(min=1)


def _spread(dataset: list[Tokenized], micro: int) -> list[list[Tokenized]]:
    """The start-up check's micro batches: the longest example, two between and the shortest
    (PROBE_SPREAD), longest first, `micro` to a batch as training groups them, so that the
    first batch holds the longest and a packed row is no fuller than in training."""
    order = sorted(range(len(dataset)), key=lambda i: (-example_length(dataset[i]), i))
    picks = list(dict.fromkeys(order[round(q * (len(order) - 1))] for q in PROBE_SPREAD))
    examples = [dataset[i] for i in picks]
    return [examples[s : s + micro] for s in range(0, len(examples), micro)]


def _compared(lp: SequenceLogps, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every per-sequence value a loss may read from this batch, named "<role>.<kind>", with the
    token count that sets its rounding tolerance: log-probs, token counts (exact), and the
    extras asked for (LD-DPO's shared part, WPO's per-token mean, whole-sequence log-probs, and
    KTO's KL rows)."""
    values: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for number, name in enumerate(ROLE_NAMES):
        if name not in lp:
            continue
        v, tokens = lp[name], batch["tokens"][batch["role"] == number]
        exact = torch.zeros_like(tokens)
        kinds = {
            "logps": (v.logps, tokens),
            "tokens": (v.tokens, exact),
            "shared": (v.shared, tokens),
            "wpo": (v.wpo, torch.ones_like(tokens)),
            "whole": (v.whole, v.whole_tokens),
            "whole_tokens": (v.whole_tokens, exact),
        }
        values.update({f"{name}.{kind}": pair for kind, pair in kinds.items() if pair[0] is not None})
    return values


def _objective(lp: SequenceLogps) -> torch.Tensor:
    """A scalar of every differentiable value a loss may read, each sequence and each kind of
    value with its own weight, so that a gradient reaching the wrong sequence changes it."""
    chosen, rejected = lp[ROLE_NAMES[CHOSEN]], lp[ROLE_NAMES[REJECTED]]
    total = chosen.logps.new_zeros(())
    for k, value in enumerate((chosen.logps, rejected.logps, chosen.shared, rejected.shared, chosen.whole)):
        if value is not None and value.numel():
            total = total + (torch.linspace(1, 2, value.numel(), device=value.device) * value).sum() / (k + 1)
    return total


def _grad_norm(params: list[torch.Tensor]) -> float:
    return float(sum(p.grad.float().pow(2).sum() for p in params if p.grad is not None) ** 0.5)


class _Check:
    """The plain path (padded rows, full logits) on the start-up check's micro batches, and
    the comparison of another path with it. The gradient is compared on the first micro batch
    (the longest example's) through the parameters' own .grad, without a second copy: the
    plain gradient, then minus the candidate's, leaves their difference there."""

    def __init__(self, model: torch.nn.Module, batches: list[list[Tokenized]], pad_id: int, needs: frozenset[str]):
        self.model, self.batches, self.pad_id = model, batches, pad_id
        self.extras = frozenset(needs) & {SHARED, WPO, WHOLE}
        self.kl = KL_ROWS in needs
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if hasattr(model, "_original_forward"):  # accelerate's mixed precision: the forward runs in autocast,
            self.dtype = torch.bfloat16  # so rounding is 16-bit whatever the weights (train.mixed_precision)
        # Gradient checkpointing acts in train mode only: the gradient pass keeps that mode so
        # that it needs no more memory than a training step (dropout is off by default).
        inner = inner_model(model)
        new = hasattr(type(inner), "is_activation_checkpointing")  # transformers >= 5.x; the old name warns
        self.grad_mode = bool(
            getattr(inner, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False)
        )
        with torch.no_grad():
            self.plain = [_compared(*self._scored(PLAIN, b)) for b in batches]

    def _scored(self, path: BatchPath, examples: list) -> tuple[SequenceLogps, dict]:
        layout, head, attention = path
        batch = collate(examples, self.pad_id, kl=self.kl, layout=layout, whole=WHOLE in self.extras)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with use_attention(self.model, attention) if attention else nullcontext():
            return batch_logps(self.model, batch, self.extras, head=head, stats=False).logps, batch

    def problem(self, path: BatchPath, gradients: bool) -> str | None:
        """What is off on this path (a value, or the gradient), or None within rounding."""
        with torch.no_grad():
            for examples, plain in zip(self.batches, self.plain, strict=True):
                got = _compared(*self._scored(path, examples))
                for name, (want, tokens) in plain.items():
                    diff = (got[name][0] - want).abs()
                    if not bool((diff <= _tolerance(self.dtype, tokens)).all()):
                        return f"{name} off by {float(diff.max()):.3g}"
        return self._gradient_problem(path) if gradients else None

    def _gradient_problem(self, path: BatchPath) -> str | None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return None
        self.model.train(self.grad_mode)
        try:
            _objective(self._scored(PLAIN, self.batches[0])[0]).backward()
            plain = _grad_norm(params)
            (-_objective(self._scored(path, self.batches[0])[0])).backward()
            diff = _grad_norm(params)
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.eval()
        if diff > GRADIENT_TOLERANCE.get(self.dtype, HALF_GRADIENT_TOLERANCE) * plain:
            return f"gradient off by {diff / max(plain, 1e-30):.3g} of its norm"
        return None


def probe(
    choice: Choice,
    model: torch.nn.Module,
    dataset: list[Tokenized],
    pad_id: int,
    needs: frozenset[str] = frozenset(),
    micro: int = 4,
) -> Choice:
    """Check `choice` against padded rows with full logits on a few examples of `dataset` (the
    longest, the shortest and two between, in micro batches of `micro`): the per-sequence
    log-probs, the extras the loss `needs`, and the gradient of one micro batch. Keep `choice`
    if they agree within rounding; else, or if the path fails, warn and fall back to the best
    that agrees. Gradients left in the parameters before are kept."""
    fast = (choice.layout, choice.head, choice.attention)
    candidates = [fast, (choice.layout, choice.head, None), ("padded", choice.head, None), (choice.layout, None, None)]
    candidates = [c for i, c in enumerate(candidates) if c not in candidates[:i] and c != PLAIN]
    if not candidates or not dataset:
        return choice
    was_training = model.training
    kept = {p: p.grad for p in model.parameters()}
    for p in kept:
        p.grad = None
    model.eval()
    try:
        check = _Check(model, _spread(dataset, max(1, micro)), pad_id, needs)
        return _first_exact(choice, candidates, check)
    finally:
        model.train(was_training)
        for p, grad in kept.items():
            p.grad = grad


def _path_name(path: BatchPath) -> str:
    _, head, attention = path
    return ("the chunked head" if head else "full logits") + (f" on {attention}" if attention else "")


def _first_exact(choice: Choice, candidates: list[BatchPath], check: _Check) -> Choice:
    """The first candidate path that agrees with the plain one (`choice` itself if it is the
    first), else padded rows with full logits; one warning line naming each that does not."""
    n = sum(len(b) for b in check.batches)
    tried: list[str] = []
    for path in candidates:
        layout, head, attention = path
        try:
            problem = check.problem(path, gradients=not choice.sharded)
        except Exception as e:  # whatever a faster path raises, the plain one is the answer
            first = str(e).splitlines()[0] if str(e) else ""
            problem = f"failed ({type(e).__name__}: {first})"
        if problem is None:
            if path == candidates[0]:
                what = "log-probs" if choice.sharded else "log-probs and the gradient of one micro batch"
                log.info(
                    "start-up check: %s agrees with padded full logits (%s, %d examples)", choice.describe(), what, n
                )
                return choice
            log.warning(
                "start-up check: %s disagreed with padded full logits on real examples (%s); using layout %s with %s",
                choice.describe(), "; ".join(tried), layout, _path_name(path),
            )  # fmt: skip
            why = choice.why + "; the start-up check rejected the faster path"
            return Choice(layout, head, why, choice.sharded, attention)
        tried.append(f"layout {layout}, {_path_name(path)} {problem}")
    log.warning(
        "start-up check: %s disagreed with padded full logits on real examples (%s); using padded rows with full logits",
        choice.describe(), "; ".join(tried),
    )  # fmt: skip
    return Choice("padded", None, choice.why + "; the start-up check rejected the faster paths", choice.sharded)
