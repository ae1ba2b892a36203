"""Quantized base weights (model.quantization): bitsandbytes' 4-bit (NF4/FP4) or 8-bit layers
under LoRA adapters, QLoRA (Dettmers et al. 2023).

The frozen linear layers of the transformer blocks are stored in 4 or 8 bits and dequantized
block by block for each matmul (in `compute_dtype`); the embeddings, norms and the output head
stay unquantized (transformers leaves the output head out), and peft's
`prepare_model_for_kbit_training` then keeps those in float32. Only the adapters train.

bitsandbytes and transformers are imported inside the functions that use them: bitsandbytes
takes seconds to import, and only a quantized run needs it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from dpo_cli.modeling.options import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WORKS = (
    "quantized LoRA runs on one process or under DDP (accelerate launch --multi_gpu, torchrun), each process "
    "holding the whole quantized base; for a sharded launch remove model.quantization.bits"
)


def compute_dtype(m: ModelConfig) -> torch.dtype:
    """model.quantization.compute_dtype, else model.dtype (float32 for model.dtype=auto)."""
    return DTYPES[m.quantization.compute_dtype or (m.dtype if m.dtype in DTYPES else "float32")]


def bnb_config(m: ModelConfig) -> Any:
    """transformers' BitsAndBytesConfig for model.quantization."""
    from transformers import BitsAndBytesConfig

    q = m.quantization
    if q.bits == 8:
        # 8-bit layers compute in their input's dtype; the compute dtype is recorded all the same
        # (in the model's quantization_config) as the dtype a merged export is written in.
        return BitsAndBytesConfig(load_in_8bit=True, bnb_4bit_compute_dtype=compute_dtype(m))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(m),
    )


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model under a peft wrapper) holds bitsandbytes-quantized weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def exact_cpu_matmuls(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on their dequantize-then-matmul path on CPUs with
    AVX512-BF16. There, bitsandbytes 0.50 repacks a layer's weights on its first forward in eval
    mode without gradients (the reference's, an evaluation's) for a bf16 inference kernel, and
    from then on every forward, training ones too, runs that kernel: outputs change by ~2e-3
    and no gradient reaches the layer's input, so the adapters below it get wrong gradients
    (measured: tests/test_qlora.py). Each layer says whether it may use that kernel
    (`support_avx512bf16_for_cpu`); it is told no."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def merged_dequantized(peft_model: Any, adapter_dir: Any) -> torch.nn.Module:
    """A plain model (no bitsandbytes, no quantization_config) with the adapter saved in
    `adapter_dir` merged in, from the quantized `peft_model` (taken apart: call last): its base
    dequantized (each layer's weights as its forward uses them), the adapter loaded onto that
    and merged in float32, the result cast to the compute dtype (model.quantization.compute_dtype,
    default model.dtype). peft's own merge over a quantized base would quantize the sum again,
    adding a second rounding to the adapter's update."""
    from peft import PeftModel

    dtype = peft_model.get_base_model().config.quantization_config.bnb_4bit_compute_dtype
    plain = peft_model.unload().dequantize(dtype=torch.float32).to(torch.float32)
    return PeftModel.from_pretrained(plain, str(adapter_dir)).merge_and_unload().to(dtype)


def trainable_checkpoints(accelerator: Any) -> None:
    """Checkpoints of a quantized policy hold its trainable tensors only (the adapters, the
    copies of model.lora.modules_to_save): bitsandbytes' packed weights do not load back into a
    quantized model through load_state_dict, and need not, since a resumed run quantizes the
    same base weights again, value for value (quantization is deterministic). accelerate's own
    save and load hooks filter what is written and load what was."""
    from accelerate.utils import SAFE_WEIGHTS_NAME

    def trainable(model: torch.nn.Module) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            if is_quantized(accelerator.unwrap_model(model)):
                names = trainable(model)
                weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def load_hook(models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        for i, model in enumerate(list(models)):
            if not is_quantized(accelerator.unwrap_model(model)):
                continue
            name = SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".safetensors", f"_{i}.safetensors")
            state = load_file(os.path.join(input_dir, name))
            missing = sorted(trainable(model) - set(state))
            if missing:
                raise RuntimeError(f"{name} lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
            model.load_state_dict(state, strict=False)
            models.remove(model)  # loaded: accelerate skips it

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _zero_stage() -> int | None:
    """The DeepSpeed ZeRO stage an `accelerate launch` asked for, from its environment (a
    DeepSpeed JSON file's stage when it names one), or None."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none" and os.path.isfile(path):
        try:
            with open(path) as f:
                stage = json.load(f).get("zero_optimization", {}).get("stage")
            return int(stage) if stage is not None else None
        except (OSError, ValueError):
            return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
    return int(stage) if stage.isdigit() else 2  # accelerate's default stage


def _enabled(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def launch_problem(bits: int) -> str | None:
    """A sharded launch (from accelerate's environment) that quantized weights cannot use.
    accelerate 1.16's FSDP2 leaves bitsandbytes' uint8-stored 4-bit weights unsharded (whole on
    every process, with a warning) unless bnb_4bit_quant_storage is a float dtype, and cannot
    shard 8-bit ones at all; ZeRO-3 partitions parameters the same way. Neither is tested here
    (they need GPUs), so both are refused, saying what works."""
    key = f"model.quantization.bits={bits}"
    if _enabled("ACCELERATE_USE_FSDP"):
        return (
            f"{key} under FSDP (ACCELERATE_USE_FSDP=true): FSDP cannot shard bitsandbytes' quantized weights; {WORKS}"
        )
    if _enabled("ACCELERATE_USE_DEEPSPEED") and _zero_stage() == 3:
        return (
            f"{key} under DeepSpeed ZeRO-3: ZeRO-3 cannot partition bitsandbytes' quantized weights; {WORKS} "
            "(or DeepSpeed ZeRO stage 1 or 2)"
        )
    return None


def device_problem(bits: int, device: str) -> str | None:
    """Whether bitsandbytes can run quantized layers on `device` (cuda or cpu), as it says itself."""
    key = f"model.quantization.bits={bits}"
    try:
        import bitsandbytes
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except Exception as e:  # noqa: BLE001 - a missing package or a broken native library
        return f"{key} needs bitsandbytes, which does not import here ({type(e).__name__}: {str(e)[:200]}); pip install bitsandbytes"
    if device not in bitsandbytes.supported_torch_devices:
        supported = ", ".join(sorted(bitsandbytes.supported_torch_devices))
        return f"{key}: bitsandbytes {bitsandbytes.__version__} has no kernels for {device} (it supports {supported})"
    if device == "cuda" and isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        return (
            f"{key}: bitsandbytes {bitsandbytes.__version__} found no native library for this CUDA version; "
            "run python -m bitsandbytes for what it needs"
        )
    return None


def quantization_problems(m: ModelConfig) -> list[str]:
    """What this launch and this machine say of model.quantization (its own checks are the
    section's, `options.quantization_problems`)."""
    bits = m.quantization.bits
    if bits not in (4, 8):
        return []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = [p for p in (launch_problem(bits), device_problem(bits, device)) if p]
    if bits == 8 and m.lora.use_dora and device == "cpu":
        # Seen with bitsandbytes 0.50.2 and peft 0.21.2: the first forward fails inside
        # bitsandbytes (the layer's SCB scale is None after peft's DoRA set-up). Untried on CUDA.
        p.append(
            "model.lora.use_dora=true over model.quantization.bits=8 fails on CPU (peft's DoRA set-up leaves "
            "bitsandbytes' 8-bit layers without their scales); use model.quantization.bits=4 with DoRA, or "
            "model.lora.use_dora=false"
        )
    return p
