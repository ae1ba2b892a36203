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


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct names of the model's linear layers (what target_modules may list)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def apply_lora(
    model: torch.nn.Module, lora: options.LoraConfig, gradient_checkpointing: bool, task_type: str = "CAUSAL_LM"
) -> torch.nn.Module:
    """`model` wrapped with LoRA adapters as `lora` (the config section model.lora) says. `task_type`:
    peft's, which decides what else trains (SEQ_CLS: the new score head, whole, modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    targets = list(targets) if isinstance(targets, (list, tuple)) else str(targets)
    if gradient_checkpointing:
        # With the embeddings frozen, checkpointed blocks would see inputs that need no grad;
        # non-reentrant checkpointing handles that, and this keeps reentrant variants right too.
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type=task_type
    )
    try:
        with warnings.catch_warnings():  # peft calls a transformers property deprecated for v6
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(
            [
                f"model.lora.target_modules={targets!r}: {str(e).splitlines()[0][:200]}; "
                f"this model's linear layers are: {', '.join(linear_module_names(model))} (or use all-linear)"
            ]
        ) from None


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
