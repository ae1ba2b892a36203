"""The reference: where a run's reference log-probs come from.

Every source answers the same call, `reference(batch, extras) -> SequenceLogps`, so the loop
and the losses never ask which one they have (DESIGN.md, "The reference is a source"):

- `ModelReference`: a frozen model. By default a copy of the initial policy; with
  `reference.name_or_path` a separately loaded model (e.g. the SFT model), in
  `reference.dtype`.
- `AdapterReference`: under LoRA, the policy itself with its adapter switched off for the
  forward: the base weights are the reference, so no second copy exists.
- `PrecomputedReference`: a table of log-probs per example, computed once before training
  (`reference.precompute`, see `refcache`) and looked up by the batch's `index`.
- None, when no loss term needs a reference.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from dpo_cli.batch import ROLE_NAMES
from dpo_cli.errors import ModelLoadError
from dpo_cli.lmhead import Head
from dpo_cli.logprobs import CHOSEN, REJECTED, SHARED, RoleValues, SequenceLogps, batch_logps
from dpo_cli.modeling.options import ModelConfig
from dpo_cli.schema import Config, TrainConfig

log = logging.getLogger(__name__)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


def _detached(values: SequenceLogps) -> SequenceLogps:
    """Ordinary tensors from inference-mode ones, so that a loss may save them for backward."""
    roles = {
        name: RoleValues(**{k: None if v is None else v.clone() for k, v in vars(r).items()})
        for name, r in values.roles.items()
    }
    return SequenceLogps(roles, values.nll_tokens, values.nll_whole_tokens)


class ModelReference:
    """A frozen model of its own: eval mode (no dropout), no gradients, no optimizer state. Its
    forward runs in inference mode, scoring only what the loss needs (no mean-logit metric;
    with a `head`, the LM head on the response positions only)."""

    def __init__(self, model: torch.nn.Module, what: str, head: Head | None = None):
        self.model = _frozen(model)
        self.what = what
        self.head = head

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> str:
        return f"{self.what} ({self.num_parameters() / 1e6:.2f}M parameters, {next(self.model.parameters()).dtype})"

    def __call__(self, batch: dict[str, torch.Tensor], extras: frozenset[str] = frozenset()) -> SequenceLogps:
        with torch.inference_mode():
            values = batch_logps(self.model, batch, extras, head=self.head, stats=False).logps
        return _detached(values)


class AdapterReference:
    """The policy module itself, run in eval mode without gradients: under LoRA with the
    adapter switched off (the base weights are the reference, so no second copy exists); and,
    before any update, as the initial policy when precomputing reference log-probs. (no_grad,
    not inference mode: its modules are the policy's, and must not cache inference tensors.)"""

    def __init__(self, model: torch.nn.Module, adapter_off: bool = True, head: Head | None = None):
        self.model = model
        self.adapter_off = adapter_off
        self.head = head

    def describe(self) -> str:
        if self.adapter_off:
            return "the base model with the LoRA adapter disabled (no second copy)"
        return "the initial policy"

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], extras: frozenset[str] = frozenset()) -> SequenceLogps:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter() if self.adapter_off else nullcontext():
                return batch_logps(self.model, batch, extras, head=self.head, stats=False).logps
        finally:
            self.model.train(was_training)


class PrecomputedReference:
    """Reference log-probs looked up per example: `table` holds (n, 2) float32 tensors
    `logps`, `tokens` and `shared`, column 0 for an example's CHOSEN sequence and column 1 for
    its REJECTED one (an unpaired example fills the column of its role)."""

    def __init__(self, table: dict[str, torch.Tensor], what: str):
        self.table = table
        self.what = what

    def describe(self) -> str:
        return self.what

    def __call__(self, batch: dict[str, torch.Tensor], extras: frozenset[str] = frozenset()) -> SequenceLogps:
        role, index = batch["role"], batch["index"]
        device = index.device
        if self.table["logps"].device != device:
            self.table = {k: v.to(device) for k, v in self.table.items()}
        rows = {CHOSEN: index[role == CHOSEN], REJECTED: index[role == REJECTED]}

        def look(name: str, which: int) -> torch.Tensor:
            return self.table[name][rows[which], which]

        # The response lengths the table was computed on must be this batch's: anything else
        # means the table belongs to other data, and its values would be silently wrong.
        tokens = torch.cat([batch["tokens"][role == CHOSEN], batch["tokens"][role == REJECTED]])
        expected = torch.cat([look("tokens", CHOSEN), look("tokens", REJECTED)])
        if not torch.equal(tokens, expected):
            raise RuntimeError("precomputed reference log-probs do not match this batch's response lengths")

        def role(which: int) -> RoleValues:
            shared = look("shared", which) if SHARED in extras else None
            return RoleValues(look("logps", which), look("tokens", which), shared=shared)

        return SequenceLogps({ROLE_NAMES[which]: role(which) for which in (CHOSEN, REJECTED)})


def reference_model_config(cfg: Config) -> ModelConfig:
    """The model section that loads `reference.name_or_path`: the policy's settings (attention,
    remote code) with the reference's source and dtype, no LoRA, no gradient checkpointing, and
    not quantized (model.quantization is the policy's: a separate reference loads in
    reference.dtype)."""
    r, m = cfg.reference, cfg.model
    return dataclasses.replace(
        m, name_or_path=r.name_or_path, revision=r.revision, gguf_file=r.gguf_file, tokenizer=None,
        random_init=None, dtype=r.dtype or m.dtype, gradient_checkpointing=False,
        lora=dataclasses.replace(m.lora, r=None), quantization=dataclasses.replace(m.quantization, bits=None),
    )  # fmt: skip


def check_reference_tokenizer(cfg: Config, tokenizer: Any) -> None:
    """A separate reference must read the policy's token ids as the same tokens: DPO compares
    the log-probs of one sequence of ids under both models. Checked before any weights load."""
    from dpo_cli.modeling import load_tokenizer

    if cfg.reference.name_or_path is None:
        return
    try:
        theirs = load_tokenizer(reference_model_config(cfg))
    except ModelLoadError as e:
        raise ModelLoadError(f"reference.name_or_path={cfg.reference.name_or_path!r}: {e}") from None
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ModelLoadError(
            f"reference.name_or_path={cfg.reference.name_or_path!r} has a different tokenizer from the policy's "
            f"({len(theirs)} vs {len(tokenizer)} tokens, or other ids): DPO compares the log-probs of the same "
            "token ids under both models; use a reference from the same model family, or set model.tokenizer"
        )


def load_reference_model(
    cfg: Config, tokenizer: Any, policy: torch.nn.Module, head: Head | None = None
) -> ModelReference:
    """The live reference model: the separate model when reference.name_or_path is set,
    else a frozen copy of the initial `policy` (cast to reference.dtype when that differs).
    When the policy scores with a chunked LM `head`, so does the reference, if its model allows."""
    from dpo_cli.modeling import DTYPES, load_model

    if cfg.reference.name_or_path is not None:
        model = load_model(reference_model_config(cfg), tokenizer, cfg.train.seed)
        what = f"{cfg.reference.name_or_path} (reference.name_or_path)"
    else:
        model = copy.deepcopy(policy)
        if cfg.reference.dtype not in (None, "auto", cfg.model.dtype):
            model.to(DTYPES[cfg.reference.dtype])
        what = "frozen copy of the initial policy"
    own_head = Head.find(model, head.chunk)[0] if head is not None else None
    return ModelReference(model, what, own_head)


def place_reference(model: torch.nn.Module, accelerator: Any, t: TrainConfig) -> Any:
    """A frozen reference model made ready to run beside the policy: on this process's device,
    or, when the policy's weights are sharded, split across processes the same way (FSDP2, or
    a DeepSpeed ZeRO-3 inference engine), never whole on each of them."""
    from accelerate import DistributedType

    from dpo_cli.distributed import sharded

    if not sharded(accelerator):
        return model.to(accelerator.device)
    if accelerator.distributed_type == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return _frozen(fsdp2_prepare_model(accelerator, model))
    import deepspeed  # DeepSpeed launches only: accelerate imports it for them

    precision = {"bf16": {"enabled": t.mixed_precision == "bf16"}, "fp16": {"enabled": t.mixed_precision == "fp16"}}
    config = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "zero_optimization": {"stage": 3}, **precision}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return _frozen(engine)


def live_reference(
    cfg: Config, tokenizer: Any, policy: torch.nn.Module, copy_policy: bool = True, head: Head | None = None
) -> ModelReference | AdapterReference:
    """The model-backed reference for `policy` (the unwrapped model, before any update; `head`
    its chunked LM head, if it scores with one). With `copy_policy=False` (precomputing before
    training) the initial policy serves as itself."""
    lora = cfg.model.lora.r is not None
    same_dtype = cfg.reference.dtype in (None, cfg.model.dtype)
    if cfg.reference.name_or_path is None and (lora or (not copy_policy and same_dtype)):
        return AdapterReference(policy, adapter_off=lora, head=head)
    return load_reference_model(cfg, tokenizer, policy, head)


def release(reference: Any) -> None:
    """Drop a separate reference model's weights (after precomputing with it)."""
    if isinstance(reference, ModelReference):
        reference.model = None
    gc.collect()


def is_adapter(model: torch.nn.Module) -> bool:
    """Whether `model` is a LoRA (peft) model, whose base, with the adapter off, is the reference.
    Asked of the loaded model: in `mode=eval` the command line sets no model.lora.r."""
    from peft import PeftModel  # loaded only where asked: peft is a heavy import

    return isinstance(model, PeftModel)


@contextmanager
def generating_model(
    cfg: Config, reference: Any, policy: torch.nn.Module, tokenizer: Any, device: Any
) -> Iterator[Any]:
    """The model whose samples are the reference's, for generation evaluation: the live
    reference model (an `AdapterReference`'s with its adapter off); else, before any update,
    the policy itself (with its adapter off when it is an adapter); else (a separate reference
    whose log-probs were precomputed) that model, loaded for the while."""
    if isinstance(reference, ModelReference) and reference.model is not None:
        yield reference.model
    elif isinstance(reference, AdapterReference):
        with reference.model.disable_adapter() if reference.adapter_off else nullcontext():
            yield reference.model
    elif cfg.reference.name_or_path is None:
        with policy.disable_adapter() if is_adapter(policy) else nullcontext():
            yield policy
    else:
        loaded = load_reference_model(cfg, tokenizer, policy)
        loaded.model.to(device)
        try:
            yield loaded.model
        finally:
            release(loaded)
