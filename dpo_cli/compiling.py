"""train.compile: torch.compile of the policy, one decoder layer at a time.

Each block is compiled on its own (`nn.Module.compile`), as torchtitan compiles LLM training:
the blocks share one compiled graph (their code is the same, and dynamo passes their parameters
as inputs), a change of batch shape recompiles one block rather than the whole model, and what
runs around the blocks stays in eager mode: FSDP's per-layer hooks, gradient checkpointing, the
embedding, and the hook by which the chunked LM head reads the last hidden state. Attention is
inside the blocks, so under flex_attention its kernel is fused into the compiled graph.

The blocks are compiled after the start-up check (`layout.probe`), which tries several layouts
and attention back-ends; a frozen reference copy of the policy runs uncompiled (a deep copy does
not keep a module's compiled call). Generation runs its blocks eagerly (`eager`): decoding from a
KV cache has other shapes at every token. The first steps pay for compiling (seconds to
minutes), and a new batch shape may compile again until dynamo marks the lengths dynamic;
`train.compile` stays off by default until it is measured to pay on a GPU (README, On a GPU).
"""

from __future__ import annotations

import contextlib
import logging
import shutil

import torch

from dpo_cli.lmhead import inner_model

log = logging.getLogger(__name__)
COMPILERS = ("cc", "gcc", "clang", "c++", "g++")  # inductor builds its CPU kernels with one of these


def compiler_problem(cpu: bool) -> str | None:
    """Why train.compile cannot run here (None: it can): on a CPU, inductor needs a C++ compiler."""
    if cpu and not any(shutil.which(c) for c in COMPILERS):
        return (
            "train.compile=true on a CPU needs a C++ compiler (torch.compile builds CPU kernels with it; none of "
            f"{', '.join(COMPILERS)} is on PATH); install one (apt-get install g++) or set train.compile=false"
        )
    return None


def eager() -> contextlib.AbstractContextManager:
    """Within: compiled modules run their eager code (torch.compiler.set_stance, torch >= 2.6)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's decoder blocks: its largest ModuleList of modules of one class (None if none)."""
    best = None
    for module in inner_model(model).modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    return best


def compile_layers(model: torch.nn.Module) -> str:
    """Compile `model`'s decoder blocks in place (the whole inner model if it has none); what was compiled."""
    layers = decoder_layers(model)
    if layers is None:
        inner_model(model).compile()
        return f"the whole {type(inner_model(model)).__name__} (no decoder blocks found)"
    for layer in layers:
        layer.compile()
    return f"{len(layers)} {type(layers[0]).__name__} blocks"
