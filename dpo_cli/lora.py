"""LoRA through peft (`model.lora.r` and friends): small trainable adapters beside frozen
base weights. The base weights then double as the reference (the adapter switched off, see
`reference.AdapterReference`), so a LoRA run holds one model, not two."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from dpo_cli import memory
from dpo_cli.errors import ConfigError
from dpo_cli.modeling import options
from dpo_cli.modeling.quantize import is_quantized


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct names of the model's linear layers (what target_modules may list)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def tied_embeddings(model: torch.nn.Module) -> bool:
    """Whether the model's output head shares its weight with the input embedding."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def apply_lora(
    model: torch.nn.Module, lora: options.LoraConfig, gradient_checkpointing: bool, task_type: str = "CAUSAL_LM"
) -> torch.nn.Module:
    """`model` wrapped with LoRA adapters as `lora` (the config section model.lora) says; `task_type`
    is peft's, which decides what else trains (SEQ_CLS: the new score head, whole). Over
    quantized weights, peft's prepare_model_for_kbit_training first (QLoRA's recipe): every
    base parameter frozen, and the unquantized ones (embeddings, norms, output head) in float32
    so that the adapters' gradients flow through full-precision norms. Gradient checkpointing
    stays dpo-cli's own (non-reentrant, `load._enable_checkpointing`)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    kwargs = options.peft_kwargs(lora, tied_embeddings(model))
    targets = kwargs["target_modules"]
    if gradient_checkpointing:
        # With the embeddings frozen, checkpointed blocks would see inputs that need no grad;
        # non-reentrant checkpointing handles that, and this keeps reentrant variants right too.
        model.enable_input_require_grads()
    config = LoraConfig(**{**kwargs, "task_type": task_type})
    try:
        with warnings.catch_warnings():  # peft calls a transformers property deprecated for v6
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(model, config)
    except ValueError as e:
        what = str(e).splitlines()[0][:200]
        if lora.modules_to_save and "modules_to_save" in str(e):
            raise ConfigError([f"model.lora.modules_to_save={lora.modules_to_save!r}: {what}"]) from None
        raise ConfigError(
            [
                f"model.lora.target_modules={targets!r}: {what}; "
                f"this model's linear layers are: {', '.join(linear_module_names(model))} (or use all-linear)"
            ]
        ) from None
    _check_saved(wrapped, lora.modules_to_save)
    return wrapped


def base_state_dict(peft_model: Any) -> dict[str, torch.Tensor]:
    """The base model's tensors under its own names, without the adapter: peft keeps each
    wrapped layer's own weight as `<layer>.base_layer.<param>`, and a module of modules_to_save
    as `<module>.original_module.<param>` beside its trained copy (which the adapter holds)."""
    return {
        k.replace(".base_layer.", ".").replace(".original_module.", "."): v
        for k, v in peft_model.get_base_model().state_dict().items()
        if "lora_" not in k and ".modules_to_save." not in k
    }


def _check_saved(model: torch.nn.Module, names: list[str] | None) -> None:
    """Refuse model.lora.modules_to_save names that matched no module (peft skips them silently)."""
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}
    missing = [n for n in names or [] if n.rsplit(".", 1)[-1] not in wrapped]
    if missing:
        base = model.get_base_model().named_modules()
        children = sorted({n.rsplit(".", 1)[-1] for n, _ in base if n and not n.rsplit(".", 1)[-1].isdigit()})
        raise ConfigError(
            [
                f"model.lora.modules_to_save={names!r}: this model has no module named {', '.join(missing)}; "
                f"its modules are named: {', '.join(children)}"
            ]
        )


def check_targets(m: options.ModelConfig, tokenizer: Any) -> None:
    """Refuse target modules the policy does not have (the config section `model`, LoRA on),
    before any weights load: peft wraps the policy built on the meta device (no weights), so
    that a typo fails in seconds, as mode=inspect reports it, not after minutes of loading and
    the warm start. The error is `apply_lora`'s."""
    if m.lora.r is None:
        return
    config = memory.model_config(m, tokenizer)
    dtype = memory.resolve_dtype(m.dtype, config)
    apply_lora(memory.meta_model(config, dtype, m.trust_remote_code and m.random_init is None), m.lora, False)
