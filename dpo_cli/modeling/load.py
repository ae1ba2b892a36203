"""Tokenizer and policy model: a pretrained checkpoint, or an architecture initialised randomly,
in model.dtype, with dropout off and gradient checkpointing on when asked.

transformers and tokenizers are imported inside the functions that use them: each takes a
second or more to import, and the CLI validates a config without them.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from typing import Any

import torch

from dpo_cli.errors import ConfigError, ModelLoadError
from dpo_cli.hub import looks_like_path
from dpo_cli.modeling.diagnostics import UNSET
from dpo_cli.modeling.options import ModelConfig
from dpo_cli.modeling.quantize import bnb_config, exact_cpu_matmuls, is_quantized
from dpo_cli.modeling.sources import (
    TOKENIZER_PROBE,
    pretrained_kwargs,
    random_init_config,
    source_kwargs,
    weights_problem,
)

log = logging.getLogger(__package__)  # lines name the package (as before its split into modules)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype "auto" aside
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built in code: 256 byte tokens + <pad>, <s> (BOS), </s> (EOS).

    It needs no download, covers any text, and is saved with the model like any other
    Hugging Face tokenizer, so `final/` loads with AutoTokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def load_tokenizer(model: ModelConfig) -> Any:
    """The tokenizer named by model.tokenizer (default: model.name_or_path), else the built-in one."""
    name = model.tokenizer or model.name_or_path
    if name is None:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    what = "model.tokenizer" if model.tokenizer else "model.name_or_path"
    gguf_file = None if model.tokenizer else model.gguf_file  # a separate tokenizer is a tokenizer directory
    kwargs = source_kwargs(name, model.revision, gguf_file or TOKENIZER_PROBE, what)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model.revision, trust_remote_code=model.trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer from {name!r}: {e}") from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"tokenizer {name!r} has no EOS token; responses must end with one")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out everywhere, so any id serves; EOS is the usual choice.
        log.info("tokenizer has no pad token; padding with EOS (%r)", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model: ModelConfig,
    tokenizer: Any,
    seed: int,
    auto_class: str = "AutoModelForCausalLM",
    num_labels: int | None = None,
) -> torch.nn.Module:
    """The policy: pretrained weights (model.name_or_path), or model.random_init's architecture
    initialised from `seed`, with vocab_size and special token ids taken from the tokenizer;
    in model.dtype (pretrained weights quantized as they load when model.quantization.bits is
    set; a model built in memory is quantized later, by `quantized`), with dropout off
    (model.disable_dropout) and gradient checkpointing on (model.gradient_checkpointing) when
    asked. `auto_class`: the transformers class it is built as (a task's:
    AutoModelForSequenceClassification for a reward model, whose new head has `num_labels`
    outputs and whose pooling finds the tokenizer's pad token)."""
    head = {} if num_labels is None else {"num_labels": num_labels, "pad_token_id": tokenizer.pad_token_id}
    if model.random_init is not None:
        config = random_init_config(model.random_init, tokenizer)
        _disable_dropout(config, model)
        _set(config, head)
        policy = _random_model(config, model, seed, auto_class)
    else:
        policy = _pretrained_model(model, auto_class, head)
    if model.disable_dropout:
        _zero_dropout(policy)
    if model.gradient_checkpointing:
        _enable_checkpointing(policy)
    _log_attention(policy, model.attn_implementation)
    return policy


def quantized(policy: torch.nn.Module, m: ModelConfig) -> torch.nn.Module:
    """`policy` with its linear layers quantized as model.quantization says. A pretrained model
    is quantized as it loads (`load.load_model`), and is returned as it is; one built in memory
    (a random init, after its warm start; a GGUF file's dequantized weights) goes through
    save_pretrained and from_pretrained, the one path by which transformers quantizes. See
    `quantize` for what bitsandbytes is told."""
    if m.quantization.bits is None:
        return policy
    if not is_quantized(policy):
        source = policy.config.name_or_path  # what a LoRA adapter names as its base ("" for a random init)
        with tempfile.TemporaryDirectory(prefix="dpo-cli-quantize-") as tmp:
            policy.save_pretrained(tmp, safe_serialization=True)
            policy = type(policy).from_pretrained(  # its own class: a causal LM, or a reward model's
                tmp, quantization_config=bnb_config(m), dtype=policy.dtype, attn_implementation=m.attn_implementation
            )
        policy.config.name_or_path = policy.name_or_path = source  # not the temporary directory
        if m.disable_dropout:  # the reload built new modules, with their own rates
            _zero_dropout(policy)
        if m.gradient_checkpointing:  # a setting of the module, which the reload left behind
            _enable_checkpointing(policy)
    exact_cpu_matmuls(policy)
    return policy


def _zero_dropout(policy: torch.nn.Module) -> None:
    """model.disable_dropout for nn.Dropout modules built with a rate of their own (the config's
    rates are zeroed before the model is built)."""
    for module in policy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _log_attention(policy: torch.nn.Module, requested: str | None) -> None:
    """One INFO line: the attention back-end the model runs, and why."""
    used = getattr(policy.config, "_attn_implementation", None)
    name = type(policy).__name__
    if requested is None:
        log.info("attention: %s (model.attn_implementation=null: the best %s supports)", used, name)
    else:
        log.info("attention: %s (model.attn_implementation=%s)", used, requested)


def _set(config: Any, values: dict[str, Any]) -> None:
    """Set `values` on a transformers config before a model is built from it."""
    for key, value in values.items():
        setattr(config, key, value)


def _auto(auto_class: str) -> Any:
    import transformers

    return getattr(transformers, auto_class)


def _random_model(config: Any, model: ModelConfig, seed: int, auto_class: str) -> torch.nn.Module:
    # dtype=auto means the checkpoint's dtype; a random architecture has no checkpoint: float32.
    dtype = DTYPES.get(model.dtype, torch.float32)
    torch.manual_seed(seed)
    return _auto(auto_class).from_config(config, attn_implementation=model.attn_implementation).to(dtype)


def _pretrained_model(model: ModelConfig, auto_class: str, head: dict[str, Any]) -> torch.nn.Module:
    """model.name_or_path's weights. The config is loaded first and changed (dropout off, the
    `head` values) before the modules are built from it: modules copy their rates from it when
    built. A head the checkpoint lacks (a reward model's score head) is new."""
    from transformers import AutoConfig

    auto = _auto(auto_class)

    name = model.name_or_path
    kwargs = pretrained_kwargs(model)
    if looks_like_path(name) and not model.gguf_file:
        problem = weights_problem(name, "model.name_or_path")
        if problem:
            raise ModelLoadError(problem)
    # "auto": the dtype the checkpoint's config names (or its weights', where it names none).
    dtype = "auto" if model.dtype == "auto" else DTYPES[model.dtype]
    # Quantized as it loads: the full-precision weights never exist whole in memory. (A GGUF
    # file's are dequantized whole first: `quantized` quantizes them afterwards.)
    quantize = model.quantization.bits is not None and not model.gguf_file
    quantization = {"quantization_config": bnb_config(model)} if quantize else {}
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
        _disable_dropout(config, model)
        _set(config, head)
        policy = auto.from_pretrained(
            name, config=config, dtype=dtype, attn_implementation=model.attn_implementation, **kwargs, **quantization
        )
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"could not load model {name!r}: {e}{_attention_hint(e, model)}") from None
    if model.dtype == "auto":
        log.info("model.dtype=auto: loaded in %s", policy.dtype)
    if model.gguf_file:
        # A GGUF load is dequantized into a model that still carries its GGUF origin;
        # rebuilding from the config gives a plain model that save_pretrained accepts.
        # The config's quantization_config must go too: saved into final/, it would make
        # the reloaded model GGUF-"quantized" again, and save_pretrained would refuse it.
        plain_config = copy.deepcopy(policy.config)
        if hasattr(plain_config, "quantization_config"):
            del plain_config.quantization_config
        plain = auto.from_config(plain_config, attn_implementation=model.attn_implementation)
        plain = plain.to(policy.dtype)
        plain.load_state_dict(policy.state_dict())
        policy = plain
    return policy


def _attention_hint(error: Exception, model: ModelConfig) -> str:
    """A fix for a model that does not support an explicit model.attn_implementation."""
    text = str(error).lower()
    if model.attn_implementation not in (None, "eager") and ("attn" in text or "attention" in text):
        return f"; this model may not support model.attn_implementation={model.attn_implementation}: {UNSET}"
    return ""


def _is_dropout_rate(key: str, value: Any) -> bool:
    """A config attribute that sets a dropout probability: dropout, attention_dropout,
    hidden_dropout_prob, resid_pdrop, layerdrop (whole layers skipped at random), ..."""
    named = "dropout" in key or key.endswith(("pdrop", "layerdrop"))
    return named and isinstance(value, float) and value > 0


def zero_config_dropout(config: Any, prefix: str = "") -> list[str]:
    """Set every dropout rate in a transformers `config` (and its sub-configs) to 0 before a model
    is built from it; returns what was changed, as `key=old value`.

    Zeroing torch.nn.Dropout modules is not enough: many models (OPT, GPT-Neo, Falcon, and
    attention dropout almost everywhere) apply dropout functionally, with a rate copied from
    the config when the module is built. DPO compares log-probs of the same sequences under
    the policy (train mode) and the reference (eval mode); dropout would add noise to exactly
    that difference, and the first loss would not be log 2. final/config.json then records the
    rates the model was trained with (0).
    """
    from transformers import PretrainedConfig

    zeroed = []
    for key, value in list(vars(config).items()):
        if _is_dropout_rate(key, value):
            setattr(config, key, 0.0)
            zeroed.append(f"{prefix}{key}={value}")
        elif isinstance(value, PretrainedConfig):  # text_config, vision_config, ...
            zeroed += zero_config_dropout(value, f"{prefix}{key}.")
    return zeroed


def _disable_dropout(config: Any, model: ModelConfig) -> None:
    """model.disable_dropout on the config a model is about to be built from."""
    if model.disable_dropout:
        zeroed = zero_config_dropout(config)
        if zeroed:
            log.info("model.disable_dropout: set %s to 0 in the model config", ", ".join(zeroed))


def _enable_checkpointing(policy: torch.nn.Module) -> None:
    """Gradient checkpointing, non-reentrant: the reentrant variant (transformers' default
    before v5) backpropagates into a checkpointed block only when its inputs require grad, so
    with frozen embeddings (LoRA) the blocks below the adapters would get no gradient."""
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as e:
        raise ConfigError([f"model.gradient_checkpointing=true: {e}; set model.gradient_checkpointing=false"]) from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a bitsandbytes 4-bit weight (two values per stored
    byte) counts the values it holds, its quant_state's shape."""

    def values(p: torch.nn.Parameter) -> int:
        state = getattr(p, "quant_state", None)
        return math.prod(state.shape) if state is not None and getattr(state, "shape", None) else p.numel()

    params = list(model.parameters())
    return sum(values(p) for p in params if p.requires_grad), sum(values(p) for p in params)
