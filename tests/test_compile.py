"""train.compile: the policy's decoder blocks compiled with torch.compile compute what eager ones do."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config
from test_layouts import loss_and_grads, pairs, tiny_model

from dpo_cli.compiling import compile_layers, compiler_problem, decoder_layers
from dpo_cli.config import validate
from dpo_cli.data.collate import collate
from dpo_cli.errors import ConfigError
from dpo_cli.lmhead import Head


@pytest.mark.slow  # inductor compiles the block for the CPU (about 25 s): make test-all; tests/test_gpu.py on CUDA
def test_compiled_blocks_give_the_eager_log_probs_and_gradients():
    model = tiny_model("llama", "sdpa").train()
    batch = collate(pairs(n=4), 0, layout="shared")
    head = Head.find(model, 5)[0]
    plain, plain_grads = loss_and_grads(model, batch, head)
    assert compile_layers(model) == "2 LlamaDecoderLayer blocks"
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    got, grads = loss_and_grads(model, batch, head)
    for role in ("chosen", "rejected"):
        torch.testing.assert_close(got.logps[role].logps, plain.logps[role].logps, atol=1e-5, rtol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_decoder_layers_are_the_largest_list_of_like_blocks():
    model = tiny_model("gpt2", "sdpa")
    assert decoder_layers(model) is model.transformer.h


def test_compile_on_a_cpu_without_a_compiler_is_refused_before_anything_loads(monkeypatch):
    assert validate(make_config(["train.compile=true"])).train.compile is True  # a compiler is here
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "needs a C++ compiler" in compiler_problem(cpu=True)
    assert compiler_problem(cpu=False) is None  # a GPU compiles with Triton
    with pytest.raises(ConfigError, match=r"train.compile=true on a CPU needs a C\+\+ compiler"):
        validate(make_config(["train.compile=true"]))
