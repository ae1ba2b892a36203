"""Tokenizer and policy model: a pretrained checkpoint, or an architecture initialised randomly.

Loading checks where the files are before touching the network, so that a model that is neither
local nor reachable fails in seconds with a message saying how to point at a local copy.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from dpo_cli.errors import ConfigError, ModelLoadError
from dpo_cli.hub import fetch_command, hub_reachable, looks_like_path, offline_setting

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype "auto" aside
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
TOKENIZER_PROBE = "tokenizer_config.json"  # the file whose presence in the hub cache means a cached tokenizer
# Files any one of which AutoTokenizer can start from (fast, SentencePiece, BPE and WordPiece vocabularies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what from_pretrained reads weights from (GGUF aside)


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


def _fetch_hint(name: str) -> str:
    fetch = fetch_command(name)
    return f"; run `{fetch}` to create it" if fetch else ""


def local_dir_problem(name: str, key: str, needs: str = "config.json") -> str | None:
    """What stops local directory `name` (the value of config key `key`) from loading, or None.

    `needs` is what must be there: config.json for a model, its .gguf file, or TOKENIZER_PROBE
    for a tokenizer (any tokenizer file). Checked up front because transformers' own errors for
    these cases blame something else (no tokenizer files: "install sentencepiece or tiktoken";
    no config.json: a JSON decoding error).
    """
    path = Path(name).expanduser()
    where = f"{key}={name!r}"
    if not path.exists():
        fix = _fetch_hint(name) or f"; point {key} at a local model directory or a hub id (org/name)"
        relative = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
        return f"{where}: no such directory{relative}{fix}"
    if not path.is_dir():
        gguf = f" and set {key.rsplit('.', 1)[0]}.gguf_file={path.name}" if path.suffix == ".gguf" else ""
        return f"{where} is a file, not a directory; point {key} at the directory holding it{gguf}"
    listing = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not listing:
        return f"{where}: directory {path} is empty{_fetch_hint(name)}; point {key} at a model directory"
    shown = ", ".join(listing[:12]) + (f", ... ({len(listing)} entries)" if len(listing) > 12 else "")
    if needs == TOKENIZER_PROBE:
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            return (
                f"{where}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...; it holds: {shown}); "
                "copy the tokenizer's files in, or set model.tokenizer to a directory or hub id that has them"
            )
        return None
    if not (path / needs).is_file():
        return f"{where}: {path} has no {needs} (it holds: {shown}); point {key} at the directory that has {needs}"
    if needs == "config.json":
        try:
            json.loads((path / needs).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{where}: {path / needs} is not valid JSON ({e}); restore it from the model's source"
    return None


def weights_problem(name: str, key: str) -> str | None:
    """What stops local model directory `name` from giving weights (its config aside), or None."""
    path = Path(name).expanduser()
    if any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        return None
    return (
        f"{key}={name!r}: {path} has config.json but no weights (*.safetensors or *.bin){_fetch_hint(name)}; "
        "copy the weight files in, or set model.gguf_file to a .gguf file in it"
    )


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
    import importlib.util

    from dpo_cli.distributed import cpu_only

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
    if value == "flex_attention" and cpu_only():
        return f"{key}=flex_attention cannot train on a CPU (PyTorch's FlexAttention has no CPU backward); {UNSET}"
    return None


def source_problems(model: Any) -> list[str]:
    """Problems with the local directories the model section names (model.name_or_path, and
    model.tokenizer or else name_or_path's tokenizer files), found without loading anything.
    Hub ids are checked when loading."""
    problems = []
    name, tokenizer = model.name_or_path, model.tokenizer
    if name is not None and looks_like_path(name):
        problems.append(local_dir_problem(name, "model.name_or_path", model.gguf_file or "config.json"))
        if tokenizer is None and model.gguf_file is None and not problems[-1]:
            problems.append(local_dir_problem(name, "model.name_or_path", TOKENIZER_PROBE))
    if tokenizer is not None and looks_like_path(tokenizer):
        problems.append(local_dir_problem(tokenizer, "model.tokenizer", TOKENIZER_PROBE))
    return [p for p in problems if p]


def source_kwargs(name: str, revision: str | None, filename: str, what: str) -> dict[str, Any]:
    """Extra from_pretrained kwargs for `name`, or a ModelLoadError when it cannot be had.
    `filename` is what must be there: config.json, a .gguf file, or TOKENIZER_PROBE."""
    if looks_like_path(name):
        problem = local_dir_problem(name, what, filename)
        if problem:
            raise ModelLoadError(problem)
        return {}
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, filename, revision=revision), str)
    if hub_reachable():
        return {}
    if cached:
        return {"local_files_only": True}
    # `org/name` may have been meant as a local path: say both readings.
    offline = offline_setting()
    unreachable = f"{offline} is set, so the Hub is not asked" if offline else "the Hub cannot be reached (offline?)"
    raise ModelLoadError(
        f"{what}={name!r}: there is no local directory {name!r} (relative to {os.getcwd()}), and hub id "
        f"{name!r} is not in the local Hugging Face cache and {unreachable}{_fetch_hint(name)}. "
        f"Download it where there is network (`hf download {name} --local-dir DIR`) and run with {what}=DIR"
    )


def load_tokenizer(model: Any) -> Any:
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


def _pretrained_kwargs(model: Any) -> dict[str, Any]:
    """from_pretrained kwargs shared by a pretrained model's config and weights (the config
    section `model`), after checking where they can come from (`source_kwargs`)."""
    source = source_kwargs(model.name_or_path, model.revision, model.gguf_file or "config.json", "model.name_or_path")
    return dict(revision=model.revision, gguf_file=model.gguf_file, trust_remote_code=model.trust_remote_code, **source)


def load_model(model: Any, tokenizer: Any, seed: int) -> torch.nn.Module:
    """The policy: pretrained weights (model.name_or_path), or model.random_init's architecture
    initialised from `seed`, with vocab_size and special token ids taken from the tokenizer;
    in model.dtype, with dropout off (model.disable_dropout) and gradient checkpointing on
    (model.gradient_checkpointing) when asked."""
    if model.random_init is not None:
        config = random_init_config(model.random_init, tokenizer)
        _disable_dropout(config, model)
        policy = _random_model(config, model, seed)
    else:
        policy = _pretrained_model(model)
    if model.disable_dropout:
        # nn.Dropout modules built with a rate of their own (the config's are zeroed above).
        for module in policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if model.gradient_checkpointing:
        _enable_checkpointing(policy)
    _log_attention(policy, model.attn_implementation)
    return policy


def _log_attention(policy: torch.nn.Module, requested: str | None) -> None:
    """One INFO line: the attention back-end the model runs, and why."""
    used = getattr(policy.config, "_attn_implementation", None)
    name = type(policy).__name__
    if requested is None:
        log.info("attention: %s (model.attn_implementation=null: the best %s supports)", used, name)
    else:
        log.info("attention: %s (model.attn_implementation=%s)", used, requested)


def random_init_config(random_init: Any, tokenizer: Any) -> Any:
    """The transformers config of model.random_init's architecture, with the vocabulary size and
    special token ids of `tokenizer`."""
    from transformers import AutoConfig

    arch = dict(random_init)
    return AutoConfig.for_model(
        arch.pop("model_type"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **arch,
    )


def _random_model(config: Any, model: Any, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # dtype=auto means the checkpoint's dtype; a random architecture has no checkpoint: float32.
    dtype = DTYPES.get(model.dtype, torch.float32)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=model.attn_implementation).to(dtype)


def _pretrained_model(model: Any) -> torch.nn.Module:
    """model.name_or_path's weights. The config is loaded first and changed (dropout off)
    before the modules are built from it: modules copy their rates from it when built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = model.name_or_path
    kwargs = _pretrained_kwargs(model)
    if looks_like_path(name) and not model.gguf_file:
        problem = weights_problem(name, "model.name_or_path")
        if problem:
            raise ModelLoadError(problem)
    # "auto": the dtype the checkpoint's config names (or its weights', where it names none).
    dtype = "auto" if model.dtype == "auto" else DTYPES[model.dtype]
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
        _disable_dropout(config, model)
        policy = AutoModelForCausalLM.from_pretrained(
            name, config=config, dtype=dtype, attn_implementation=model.attn_implementation, **kwargs
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
        plain = AutoModelForCausalLM.from_config(plain_config, attn_implementation=model.attn_implementation)
        plain = plain.to(policy.dtype)
        plain.load_state_dict(policy.state_dict())
        policy = plain
    return policy


def _attention_hint(error: Exception, model: Any) -> str:
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


def _disable_dropout(config: Any, model: Any) -> None:
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


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(config: Any) -> int | None:
    """The longest sequence a transformers config's model handles, if the config says."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(model: Any, max_length: int) -> None:
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
        config = AutoConfig.from_pretrained(name, **_pretrained_kwargs(model))
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


def position_problem(max_length: int, limit: int) -> str:
    return (
        f"data.max_length={max_length} is longer than the model's {limit} positions "
        f"(max_position_embeddings); set data.max_length<={limit}"
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
