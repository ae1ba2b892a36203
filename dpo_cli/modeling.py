"""Tokenizer and policy model: a pretrained checkpoint, or an architecture initialised randomly.

Loading checks where the files are before touching the network, so that a model that is neither
local nor reachable fails in seconds with a message saying how to point at a local copy.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch

from dpo_cli.errors import ConfigError, ModelLoadError
from dpo_cli.hub import hub_reachable, looks_like_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


def _source_kwargs(name: str, revision: str | None, filename: str, what: str) -> dict[str, Any]:
    """Extra from_pretrained kwargs for `name`, or a ModelLoadError when it cannot be had."""
    if looks_like_path(name):
        if not os.path.isdir(os.path.expanduser(name)):
            raise ModelLoadError(f"{what}={name!r}: no such directory")
        return {}
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, filename, revision=revision), str)
    if hub_reachable():
        return {}
    if cached:
        return {"local_files_only": True}
    raise ModelLoadError(
        f"model {name!r} is not in the local Hugging Face cache and the Hub cannot be reached "
        f"(offline?). Download it where there is network (`hf download {name} --local-dir DIR`) "
        f"and run with {what}=DIR"
    )


def load_tokenizer(model: Any) -> Any:
    """The tokenizer named by model.tokenizer (default: model.name_or_path), else the built-in one."""
    name = model.tokenizer or model.name_or_path
    if name is None:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    what = "model.tokenizer" if model.tokenizer else "model.name_or_path"
    kwargs = _source_kwargs(name, model.revision, model.gguf_file or "tokenizer_config.json", what)
    if model.gguf_file and not model.tokenizer:
        kwargs["gguf_file"] = model.gguf_file
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
    section `model`), after checking where they can come from (`_source_kwargs`)."""
    source = _source_kwargs(model.name_or_path, model.revision, model.gguf_file or "config.json", "model.name_or_path")
    return dict(revision=model.revision, gguf_file=model.gguf_file, trust_remote_code=model.trust_remote_code, **source)


def load_model(model: Any, tokenizer: Any, seed: int) -> torch.nn.Module:
    """The policy: pretrained weights (model.name_or_path), or model.random_init's architecture
    initialised from `seed`, with vocab_size and special token ids taken from the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[model.dtype]
    if model.random_init is not None:
        arch = dict(model.random_init)
        config = AutoConfig.for_model(
            arch.pop("model_type"),
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **arch,
        )
        torch.manual_seed(seed)
        policy = AutoModelForCausalLM.from_config(config, attn_implementation=model.attn_implementation).to(dtype)
    else:
        name = model.name_or_path
        try:
            policy = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, attn_implementation=model.attn_implementation, **_pretrained_kwargs(model)
            )
        except (OSError, ValueError, ImportError) as e:
            raise ModelLoadError(f"could not load model {name!r}: {e}") from None
        if model.gguf_file:
            # A GGUF load is dequantized into a model that still carries its GGUF origin;
            # rebuilding from the config gives a plain model that save_pretrained accepts.
            # The config's quantization_config must go too: saved into final/, it would make
            # the reloaded model GGUF-"quantized" again, and save_pretrained would refuse it.
            plain_config = copy.deepcopy(policy.config)
            if hasattr(plain_config, "quantization_config"):
                del plain_config.quantization_config
            plain = AutoModelForCausalLM.from_config(plain_config).to(dtype)
            plain.load_state_dict(policy.state_dict())
            policy = plain
    if model.disable_dropout:
        # DPO compares log-probs of the same sequences under two models; dropout would add
        # noise to exactly that difference (TRL does the same by default).
        for module in policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    return policy


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(config: Any) -> int | None:
    """The longest sequence a transformers config's model handles, if the config says."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(model: Any, max_length: int) -> None:
    """Refuse data.max_length beyond a pretrained model's positions, from its config alone (no
    weights): running past them fails late with an IndexError, or silently degrades."""
    from transformers import AutoConfig

    if model.name_or_path is None:
        return  # random_init: checked in config.validate
    name = model.name_or_path
    try:
        config = AutoConfig.from_pretrained(name, **_pretrained_kwargs(model))
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"could not load the config of model {name!r}: {e}") from None
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise ConfigError([position_problem(max_length, limit)])


def position_problem(max_length: int, limit: int) -> str:
    return (
        f"data.max_length={max_length} is longer than the model's {limit} positions "
        f"(max_position_embeddings); set data.max_length<={limit}"
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
