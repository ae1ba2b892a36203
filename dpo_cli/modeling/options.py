"""The `model` and `reference` config sections: their dataclasses and their own checks.

What each key means is said beside it. These checks read the config only; what the machine and
transformers say about it (a random init's architecture, the attention back-end) is
`diagnostics.model_problems`'s, which builds on these."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

DTYPES = ("float32", "bfloat16", "float16")
MODEL_DTYPES = (*DTYPES, "auto")  # auto: the dtype the checkpoint's config names


@dataclass
class LoraConfig:
    r: Optional[int] = None  # LoRA rank (8 to 64 is usual); null = full fine-tuning
    alpha: float = 16  # LoRA scaling numerator (the update is scaled by alpha / r)
    dropout: float = 0.0  # dropout on the LoRA branch, in [0, 1)
    target_modules: Any = "all-linear"  # peft's names: "all-linear" or a list of module names, e.g. [q_proj, v_proj]
    use_dora: bool = (
        False  # DoRA (Liu et al. 2024): adds a trainable magnitude vector per targeted layer (out_features values)
    )
    rslora: bool = (
        False  # rank-stabilized LoRA (Kalajdzievski 2023): scale the update by alpha / sqrt(r) instead of alpha / r
    )
    modules_to_save: Optional[list[str]] = (
        None  # whole modules trained (a full copy each) and saved with the adapter, e.g. [lm_head]
    )


QUANT_TYPES = ("nf4", "fp4")


@dataclass
class QuantizationConfig:
    """The frozen base weights stored in 4 or 8 bits by bitsandbytes, under trainable LoRA
    adapters (QLoRA, Dettmers et al. 2023)."""

    bits: Optional[int] = None  # 4 (QLoRA) or 8 (LLM.int8()); null = no quantization. Needs LoRA (model.lora.r)
    quant_type: str = "nf4"  # 4-bit only: nf4 (normal float, QLoRA's) or fp4
    double_quant: bool = True  # 4-bit only: quantize the per-block scales too (about 0.37 bits per parameter less)
    compute_dtype: Optional[str] = (
        None  # dtype the dequantized weights multiply in: float32, bfloat16, float16; null = model.dtype
    )


@dataclass
class WarmStartConfig:
    """SFT on the chosen (or both) responses before preference training, from random init: the
    DPO paper's recipe ("we first fine-tune on the preferred responses") for a model that has
    never seen the task."""

    steps: int = 0  # optimizer steps of SFT before DPO; 0 = none
    lr: float = 1e-3  # its learning rate (constant)
    batch_size: int = 32  # sequences per SFT step
    responses: str = "both"  # which responses it learns: both, chosen


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None  # hub id or local directory of pretrained weights (model=pretrained)
    revision: Optional[str] = None  # hub branch, tag or commit
    gguf_file: Optional[str] = None  # a .gguf file inside name_or_path to load (dequantized)
    tokenizer: Optional[str] = (
        None  # hub id or directory of the tokenizer; null = name_or_path's, or a byte tokenizer for random_init
    )
    random_init: Optional[dict[str, Any]] = (
        None  # a transformers config (model_type + its kwargs) to initialise randomly (model=tiny)
    )
    dtype: str = "float32"  # weights' dtype: float32, bfloat16, float16, auto (the checkpoint's)
    attn_implementation: Optional[str] = (
        None  # eager, sdpa, flash_attention_2, flex_attention; null = the best the model supports
    )
    trust_remote_code: bool = False  # run the model repository's own code (only for repositories you trust)
    disable_dropout: bool = True  # dropout off in policy and reference (as TRL): log-prob ratios stay deterministic
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, about 30% slower
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class ReferenceConfig:
    name_or_path: Optional[str] = (
        None  # null = the initial policy (with LoRA: the base model, adapter disabled); or a hub id / directory, e.g. the SFT model
    )
    revision: Optional[str] = None  # hub branch, tag or commit of reference.name_or_path
    gguf_file: Optional[str] = None  # a .gguf file inside reference.name_or_path to load (dequantized)
    dtype: Optional[str] = (
        None  # float32, bfloat16, float16, auto; null = model.dtype (bfloat16 halves a separate reference's memory)
    )
    precompute: bool = False  # compute the reference log-probs of train and eval data once before training, then free the reference model
    # With precompute: reuse entries keyed by reference weights, data and tokenization (sweeps share them); null = in memory only.
    cache_dir: Optional[str] = "${oc.env:DPO_CLI_REFERENCE_CACHE_DIR,'~/.cache/dpo-cli/reference'}"


def choice(key: str, value: Any, allowed: tuple[str, ...]) -> list[str]:
    return [] if value in allowed else [f"{key}={value!r} is not one of {', '.join(allowed)}; set {key}=<one of them>"]


def positive(key: str, value: Any, allow_none: bool = False) -> list[str]:
    """`key=value must be > 0` unless `value` is a number above 0 (or None, with `allow_none`);
    a section built in code can hold any value, so the type is checked too."""
    if value is None and allow_none:
        return []
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
        return [f"{key}={value!r} must be > 0"]
    return []


def _source_problems(m: ModelConfig) -> list[str]:
    """Where the weights come from: pretrained files or a random init, not both."""
    if m.name_or_path is not None and m.random_init is not None:
        return [
            f"model.name_or_path={m.name_or_path!r} and model.random_init are both set: the model group "
            "(model=tiny, the default) builds a random model from model.random_init; to train "
            f"{m.name_or_path!r}, use model=pretrained model.name_or_path={m.name_or_path}"
        ]
    if m.name_or_path is None and m.random_init is None:
        return [
            "set model.name_or_path (pretrained weights: model=pretrained model.name_or_path=DIR_OR_HUB_ID) "
            "or model.random_init (an architecture to initialise randomly, e.g. model=tiny)"
        ]
    return []


def lora_problems(lora: LoraConfig) -> list[str]:
    if lora.r is None:
        return []
    p = positive("model.lora.r", lora.r) + positive("model.lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        p.append(f"model.lora.dropout={lora.dropout} must be in [0, 1)")
    tm = lora.target_modules
    if not (isinstance(tm, str) or (isinstance(tm, list) and len(tm) and all(isinstance(x, str) for x in tm))):
        p.append(
            f"model.lora.target_modules={tm!r} must be all-linear or a list of module names, "
            "e.g. model.lora.target_modules=[q_proj,v_proj]"
        )
    saved = lora.modules_to_save
    if saved is not None and not (isinstance(saved, list) and all(isinstance(x, str) and x for x in saved)):
        p.append(f"model.lora.modules_to_save={saved!r} must be a list of module names, e.g. [lm_head]")
    return p


def peft_kwargs(lora: LoraConfig, tied: bool) -> dict[str, Any]:
    """peft.LoraConfig's arguments for the section model.lora. With modules_to_save, on a model
    that ties its input and output embeddings (`tied`), peft's ensure_weight_tying keeps the
    copies tied: a trained lm_head copy is then the trained input embedding too, as the model
    itself has one matrix for both (and the merged model, saved tied, keeps the trained values)."""
    targets = lora.target_modules
    saved = list(lora.modules_to_save) if lora.modules_to_save else None
    return dict(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(targets) if isinstance(targets, (list, tuple)) else str(targets),
        use_dora=lora.use_dora, use_rslora=lora.rslora, modules_to_save=saved, ensure_weight_tying=bool(saved) and tied,
        task_type="CAUSAL_LM",
    )  # fmt: skip


def quantization_problems(m: ModelConfig) -> list[str]:
    """model.quantization against the rest of the section: bitsandbytes' settings, and LoRA, since
    quantized weights cannot be trained (only adapters beside them)."""
    q = m.quantization
    if q.bits is None:
        return []
    if q.bits not in (4, 8):
        return [f"model.quantization.bits={q.bits!r} is not one of 4, 8 (or null: no quantization)"]
    p = choice("model.quantization.quant_type", q.quant_type, QUANT_TYPES)
    if q.bits == 8 and (q.quant_type != "nf4" or not q.double_quant):
        p.append(
            "model.quantization.quant_type and model.quantization.double_quant are 4-bit settings; 8-bit "
            "(LLM.int8()) has neither: remove them, or set model.quantization.bits=4"
        )
    if q.compute_dtype is not None:
        p += choice("model.quantization.compute_dtype", q.compute_dtype, DTYPES)
    if m.lora.r is None:
        p.append(
            f"model.quantization.bits={q.bits} needs LoRA: quantized base weights stay frozen, only adapters "
            "beside them train; set model.lora.r (e.g. model.lora.r=16), or remove model.quantization.bits"
        )
    return p


def warm_start_problems(m: ModelConfig) -> list[str]:
    ws = m.warm_start
    if ws.steps < 0:
        return [f"model.warm_start.steps={ws.steps} must be >= 0 (0 = no warm start)"]
    if not ws.steps:
        return []
    p = positive("model.warm_start.lr", ws.lr) + positive("model.warm_start.batch_size", ws.batch_size)
    p += choice("model.warm_start.responses", ws.responses, ("both", "chosen"))
    if m.lora.r is not None and m.name_or_path is not None:
        # A random-init base is saved with the adapter (final/base): its warm start travels with it.
        p.append(
            "model.warm_start fine-tunes every weight of model.name_or_path before LoRA training, and the "
            "adapter saved would name the untouched model as its base: set model.warm_start.steps=0, or train "
            "the SFT model first (loss=sft) and start from it"
        )
    return p


def section_problems(m: ModelConfig) -> list[str]:
    """The model section's problems that the config alone shows."""
    p = _source_problems(m)
    if m.gguf_file is not None and m.name_or_path is None:
        p.append("model.gguf_file needs model.name_or_path (the directory or hub id holding the file)")
    p += choice("model.dtype", m.dtype, MODEL_DTYPES) + lora_problems(m.lora) + quantization_problems(m)
    return p + warm_start_problems(m)


def reference_problems(r: ReferenceConfig, m: ModelConfig, needs_reference: bool, kl_rows: bool) -> list[str]:
    """The reference section against the model and the loss: a reference-free loss loads none,
    so reference settings would be ignored (said, not silently); KTO's KL rows mix examples per
    batch, so their reference log-probs cannot be looked up per example."""
    p = choice("reference.dtype", r.dtype, MODEL_DTYPES) if r.dtype is not None else []
    if r.dtype not in (None, m.dtype) and r.name_or_path is None and m.lora.r is not None:
        p.append(
            f"reference.dtype={r.dtype} with LoRA: the reference is the policy's own base weights (adapter "
            "disabled), which are in model.dtype; remove reference.dtype, or set reference.name_or_path"
        )
    if r.gguf_file is not None and r.name_or_path is None:
        p.append("reference.gguf_file needs reference.name_or_path (the directory or hub id holding the file)")
    if r.precompute and kl_rows:
        p.append(
            "reference.precompute=true with a loss that uses KTO's KL rows: those rows pair prompts with other "
            "examples' completions batch by batch, so their reference log-probs cannot be cached per example; "
            "set reference.precompute=false (the reference model then runs live)"
        )
    if not needs_reference:
        keys = ("name_or_path", "revision", "gguf_file", "dtype", "precompute")
        set_keys = [k for k in keys if getattr(r, k) not in (None, False)]
        if set_keys:
            p.append(
                f"{', '.join(f'reference.{k}={getattr(r, k)!r}' for k in set_keys)}: no term of the loss needs a "
                "reference model (reference-free loss), so no reference is loaded and these would be ignored; "
                "remove them"
            )
    return p
