"""The bytes a policy's weights really take, loaded as training loads it (weights, quantized when
model.quantization.bits is set, LoRA applied), beside the memory estimate's figure
(dpo-train mode=inspect). A quantized layer counts its packed weight and its quant_state's
tensors (absmax, code, and with double quantization the second level's).

    python scripts/quantized_bytes.py model=smollm2 model.lora.r=16 model.quantization.bits=4
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpo_cli import cli, memory
from dpo_cli.lora import apply_lora
from dpo_cli.modeling import load_model, load_tokenizer, quantized


def tensor_bytes(model: torch.nn.Module) -> int:
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            extra = [state.absmax, state.code] + (
                [state.state2.absmax, state.state2.code, state.offset] if state.nested else []
            )
            total += sum(t.numel() * t.element_size() for t in extra)
        scale = getattr(p, "SCB", None)  # 8-bit: the float32 scale per output row
        if scale is not None:
            total += scale.numel() * scale.element_size()
    return total


def main(overrides: list[str]) -> None:
    cli.register()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    m = OmegaConf.to_object(cfg).model
    tokenizer = load_tokenizer(m)
    estimate = memory.estimate(cfg, tokenizer, instantiate(cfg.loss), capacity_bytes=1 << 40)
    policy = quantized(load_model(m, tokenizer, seed=0), m)
    if m.lora.r is not None:
        policy = apply_lora(policy, m.lora, gradient_checkpointing=False)
    real = tensor_bytes(policy)
    print(f"weights: real {real / 2**20:.1f} MiB, estimate {estimate.weights / 2**20:.1f} MiB ({' '.join(overrides)})")


if __name__ == "__main__":
    main(sys.argv[1:])
