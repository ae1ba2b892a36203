"""What a model's config and this machine allow, checked before any weights load: the attention
back-end (model.attn_implementation) and the sequence length (data.max_length).

transformers is imported inside the functions that use it: it takes seconds to import, and the
CLI validates a config without it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from dpo_cli import distributed
from dpo_cli.errors import ConfigError, ModelLoadError
from dpo_cli.modeling.options import ModelConfig, section_problems
from dpo_cli.modeling.quantize import quantization_problems
from dpo_cli.modeling.sources import pretrained_kwargs, source_problems

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# The fix that works for any model: sdpa itself would fail on one without it (Gemma-2, Bloom).
UNSET = "leave model.attn_implementation unset (null: sdpa where the model supports it, else eager)"
FLASH_PACKAGES = {  # attn_implementation: (import name, how to install it)
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": (
        "flash_attn_interface",
        "build FlashAttention-3 from the hopper/ directory of Dao-AILab/flash-attention",
    ),
}


def attention_problem(value: str | None) -> str | None:
    """What is wrong with model.attn_implementation on this machine, or None; checked before
    any weights load (transformers would fail only after loading them)."""
    key = "model.attn_implementation"
    if value is None:
        return None  # the default: the best the model supports (`resolve_attention`)
    if value not in ATTN_IMPLEMENTATIONS:
        return f"{key}={value!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}; set one of them, or {UNSET}"
    if value in FLASH_PACKAGES:
        package, install = FLASH_PACKAGES[value]
        missing = [
            *([] if torch.cuda.is_available() else ["a CUDA GPU (none found)"]),
            *([] if importlib.util.find_spec(package) else [f"the {package} package ({install})"]),
        ]
        if missing:
            return f"{key}={value} needs {' and '.join(missing)}; {UNSET}"
    if value == "flex_attention" and distributed.cpu_only():
        return f"{key}=flex_attention cannot train on a CPU (PyTorch's FlexAttention has no CPU backward); {UNSET}"
    return None


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(config: Any) -> int | None:
    """The longest sequence a transformers config's model handles, if the config says."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def position_problem(max_length: int, limit: int) -> str:
    return (
        f"data.max_length={max_length} is longer than the model's {limit} positions "
        f"(max_position_embeddings); set data.max_length<={limit}"
    )


def check_max_length(model: ModelConfig, max_length: int) -> None:
    """The model checks that need files but no weights, run before data and weights load:
    the local directories the model section names (all their problems at once), then, from a
    pretrained model's config, data.max_length beyond its positions (running past them fails
    late with an IndexError, or silently degrades) and an attention implementation its class
    does not support (transformers would say so only when the weights load).

    Not part of config.validate, which touches no files (README's commands validate with
    example paths)."""
    from transformers import AutoConfig

    problems = source_problems(model)
    if problems:
        raise ConfigError(problems)
    if model.name_or_path is None:
        return  # random_init: checked in config.validate
    name = model.name_or_path
    try:
        config = AutoConfig.from_pretrained(name, **pretrained_kwargs(model))
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"could not load the config of model {name!r}: {e}") from None
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        problems.append(position_problem(max_length, limit))
    unsupported = unsupported_attention(config, model.attn_implementation)
    if unsupported:
        problems.append(unsupported)
    if problems:
        raise ConfigError(problems)


# What a model class says it supports, per attn_implementation (transformers' class flags).
ATTENTION_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}


def _causal_lm_class(config: Any) -> Any:
    """The transformers causal LM class for `config`, or None (remote code, or not a causal LM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def resolve_attention(config: Any, value: str | None) -> str | None:
    """The attention back-end a model built from `config` runs with model.attn_implementation
    `value`: the value itself, or for null (the default) the best the model's class supports,
    as transformers picks it: sdpa where the class supports it, else eager (Gemma-2 soft-caps
    its attention logits, Bloom adds ALiBi biases: neither has sdpa). None for remote code,
    whose class is known only once loaded. The preflight's layout and memory figures use this."""
    if value is not None:
        return value
    cls = _causal_lm_class(config)
    if cls is None:
        return None
    return "sdpa" if getattr(cls, ATTENTION_FLAGS["sdpa"], False) else "eager"


def unsupported_attention(config: Any, value: str | None) -> str | None:
    """A problem when the causal LM class for `config` declares that it does not support an
    explicitly chosen attention implementation `value` (Gemma-2 has no sdpa: it soft-caps
    attention logits); the default (null) is always supported."""
    cls = _causal_lm_class(config)
    if cls is None:
        return None  # remote code, or not a causal LM: loading will say
    if value in ATTENTION_FLAGS and getattr(cls, ATTENTION_FLAGS[value], True) is False:
        best = resolve_attention(config, None)
        return (
            f"model.attn_implementation={value}: {cls.__name__} does not support it; set "
            f"model.attn_implementation={best}, or null (the default: the best the model supports, here {best})"
        )
    return None


def random_init_problems(arch: dict[str, Any], max_length: int | None = None) -> list[str]:
    """Problems with model.random_init: its model_type and kwargs must build a transformers config."""
    arch = dict(arch)
    if "model_type" not in arch:
        return ["model.random_init needs a model_type (e.g. llama, gpt2, qwen2)"]
    from transformers import CONFIG_MAPPING, AutoConfig  # here: transformers takes seconds to import (CLI start-up)

    model_type = arch.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        return [
            f"model.random_init.model_type={model_type!r} is not a transformers model type (e.g. llama, gpt2, qwen2, mistral)"
        ]
    try:
        built = AutoConfig.for_model(model_type, **arch)
    except Exception as e:  # noqa: BLE001 - config classes raise their own validation errors
        cause = e.__cause__ or e
        first = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        return [f"model.random_init does not build a transformers config: {first[:300]}"]
    # Config classes keep unknown kwargs as plain attributes (a typo would pass silently);
    # known ones are either in the defaults or consumed (e.g. rope_theta into rope_parameters).
    known = CONFIG_MAPPING[model_type]().to_dict()
    unknown = sorted(k for k in arch if k not in known and k in vars(built))
    problems = [f"model.random_init.{k} is not a {model_type} config key; check the spelling" for k in unknown]
    limit = max_positions(built)
    if limit is not None and isinstance(max_length, int) and max_length > limit:
        problems.append(position_problem(max_length, limit))
    return problems


def model_problems(m: ModelConfig, max_length: int | None) -> list[str]:
    """Every problem of the model section: its own (`options.section_problems`), then what
    transformers says of a random init's architecture (`max_length`: data.max_length, against
    its positions), whether this machine has the attention back-end, and whether this launch and
    machine can run quantized weights."""
    p = section_problems(m) + quantization_problems(m)
    if m.random_init is not None:
        p += random_init_problems(m.random_init, max_length)
    attention = attention_problem(m.attn_implementation)
    return p + ([attention] if attention else [])
