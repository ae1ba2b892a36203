#!/usr/bin/env python
"""Optimizer state bytes of each conf/optimizer/ option on a real model, measured, next to the
memory estimate's figure (`dpo-train mode=inspect`).

    python scripts/optimizer_memory.py                      # models/smollm2-135m-instruct (make smollm2)
    python scripts/optimizer_memory.py --model DIR --options adamw,adamw8bit

For each option: the model (float32, its real weights) gets a gradient of zeros on every
parameter, the optimizer built from conf/optimizer/<option>.yaml (composed and validated as
`dpo-train` does) takes one step, and the bytes of every tensor in optimizer.state_dict() are
summed (a torchao state by the tensors it holds). The step allocates the whole state; its
values do not change its size. Needs bitsandbytes and torchao; cpu_offload_adamw needs a GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM

from dpo_cli import cli, memory
from dpo_cli.config import validate
from dpo_cli.optimizers import state_bytes

OPTIONS = "adamw,adamw8bit,paged_adamw,paged_adamw8bit,ao_adamw8bit,ao_adamw4bit"


def measure(model: torch.nn.Module, option: str) -> tuple[int, int, float]:
    """(measured state bytes, the estimate's bytes, seconds) of `option` on `model`."""
    cli.register()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=[f"optimizer={option}"]), quiet=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    started = time.perf_counter()
    optimizer = instantiate(cfg.optimizer)(params=params)
    optimizer.step()
    seconds = time.perf_counter() - started
    measured = state_bytes(optimizer.state_dict()["state"])
    numel = sum(p.numel() for p in params)
    estimate = memory.optimizer_states(cfg.optimizer).bytes(numel, sum(p.nbytes for p in params))
    del optimizer
    return measured, estimate, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct", help="a Hugging Face model directory")
    parser.add_argument("--options", default=OPTIONS, help="comma-separated conf/optimizer/ names")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(Path(args.model), dtype=torch.float32)
    numel = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {numel:,} parameters (float32), {len(list(model.parameters()))} tensors")
    print(f"{'optimizer':<18}{'state bytes':>15}{'per param':>11}{'estimate':>15}{'step s':>8}")
    for option in args.options.split(","):
        measured, estimate, seconds = measure(model, option)
        print(f"{option:<18}{measured:>15,}{measured / numel:>11.3f}{estimate:>15,}{seconds:>8.1f}")


if __name__ == "__main__":
    main()
