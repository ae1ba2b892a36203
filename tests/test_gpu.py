"""What only a GPU shows: FlexAttention's block-mask path with gradients, bf16 tolerances, the
chunked head's bf16 GEMM, and train.compile. Marked `gpu`: skipped without CUDA (tests/conftest.py);
scripts/gpu/check.sh runs them on a GPU machine.

Tolerances. float32: per-sequence log-probs within 1e-5 per scored token of padded rows on sdpa
with full logits, gradients within 1e-4 of each tensor's largest entry (as tests/test_layouts.py).
bf16 autocast: within the start-up check's own bounds (`layout._tolerance`: 1e-4 + 2e-2 per token
for log-probs; `HALF_GRADIENT_TOLERANCE` = 5% of the gradient's norm), since bf16's 8-bit mantissa
rounds each attention and matmul result at about 4e-3 relative.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import pytest
import torch
from conftest import FAST, QUIET, read_metrics, run_cli
from test_flex import long_pairs
from test_layouts import pairs, tiny_model

from dpo_cli.attention import use_attention
from dpo_cli.compiling import compile_layers
from dpo_cli.data.collate import collate
from dpo_cli.layout import HALF_GRADIENT_TOLERANCE, _tolerance, choose, probe
from dpo_cli.lmhead import Head, chunked_logps
from dpo_cli.logprobs import batch_logps

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def on_cuda(arch: str) -> torch.nn.Module:
    # FlexAttention's CUDA kernels need a head dimension of at least 16 (the tiny models have 8)
    model = tiny_model(arch, "sdpa", hidden_size=64, intermediate_size=128).to(CUDA)
    if arch == "mistral":
        model.config.sliding_window = 3  # shorter than the sequences: the block mask must apply it
    return model


def scored(model, examples, layout, head=None, attention=None):
    """Per-role log-probs and the gradient of a loss that weights every sequence differently."""
    model.zero_grad(set_to_none=True)
    batch = {k: v.to(CUDA) for k, v in collate(examples, 0, layout=layout).items()}
    with use_attention(model, attention) if attention else nullcontext():
        lp = batch_logps(model, batch, head=head, stats=False).logps
    weights = torch.linspace(1, 2, lp["chosen"].logps.numel(), device=CUDA)
    ((weights * lp["chosen"].logps).sum() - 0.5 * (weights * lp["rejected"].logps).sum()).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp, grads


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_flex_attention_rows_match_padded_rows_in_float32(arch, layout):
    model = on_cuda(arch).train()
    examples = long_pairs(3)  # rows of several 128-token blocks: skipped, full and partial ones
    plain, plain_grads = scored(model, examples, "padded")
    for head in (None, Head.find(model, 5)[0]):
        got, grads = scored(model, examples, layout, head, attention="flex_attention")
        for role in ("chosen", "rejected"):
            diff = (got[role].logps - plain[role].logps).abs()
            assert bool((diff <= 1e-5 * plain[role].tokens.clamp(min=1)).all()), (role, diff)
        largest = max(float(g.abs().max()) for g in plain_grads.values())
        for name, g in grads.items():
            scale = plain_grads[name].abs().max().clamp(min=1e-3 * largest)
            assert float(((g - plain_grads[name]) / scale).abs().max()) <= 1e-4, (name, head)


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_flex_attention_rows_match_padded_rows_under_bf16_autocast(layout):
    model = on_cuda("llama").train()
    examples = long_pairs(3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain, plain_grads = scored(model, examples, "padded")
        got, grads = scored(model, examples, layout, Head.find(model, 5)[0], attention="flex_attention")
    for role in ("chosen", "rejected"):
        diff = (got[role].logps - plain[role].logps).abs()
        assert bool((diff <= _tolerance(torch.bfloat16, plain[role].tokens)).all()), (role, diff)
    norm = sum(float(g.pow(2).sum()) for g in plain_grads.values()) ** 0.5
    off = sum(float((grads[n] - g).pow(2).sum()) for n, g in plain_grads.items()) ** 0.5
    assert off <= HALF_GRADIENT_TOLERANCE * norm, off / norm


def test_the_chunked_heads_gemm_runs_in_bf16_under_autocast_and_in_float32_without():
    """Under bf16 autocast the chunk GEMM takes bf16 inputs (tensor cores), the log-softmax and
    gather run in float32 on its result: the values equal that computation written out, and
    stay within bf16 rounding of float32 full logits; without autocast they equal float32 full
    logits within 1e-5."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    h = torch.randn(300, 256, device=CUDA, generator=g)
    w = torch.randn(5000, 256, device=CUDA, generator=g) * 0.05
    target = torch.randint(0, 5000, (300,), device=CUDA, generator=g)
    full32 = torch.log_softmax(h @ w.t(), -1).gather(1, target[:, None]).squeeze(1)
    assert (chunked_logps(h, w, None, target, 64) - full32).abs().max() < 1e-5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = chunked_logps(h, w, None, target, 64)
    # the same bf16 GEMMs (64 rows at a time: cuBLAS may round another shape differently), float32 after
    logits = torch.cat([(h[s : s + 64].bfloat16() @ w.bfloat16().t()).float() for s in range(0, 300, 64)])
    written_out = torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    assert (got - written_out).abs().max() < 1e-5
    assert (got - full32).abs().max() < 5e-2


def test_auto_picks_flex_attention_on_cuda_and_the_start_up_check_keeps_it():
    model = on_cuda("llama")
    choice = choose("auto", 64, model, sharded=False, auto_attention=True)
    assert (choice.layout, choice.attention) == ("shared", "flex_attention"), choice.why
    assert probe(choice, model, pairs(n=4), 0) is choice


def test_compiled_blocks_compute_what_eager_ones_do():
    model = on_cuda("llama").train()
    examples = pairs(n=4)
    plain, plain_grads = scored(model, examples, "shared", attention="flex_attention")
    assert "LlamaDecoderLayer" in compile_layers(model)
    got, grads = scored(model, examples, "shared", attention="flex_attention")
    for role in ("chosen", "rejected"):
        assert (got[role].logps - plain[role].logps).abs().max() <= 1e-4
    for name, g in grads.items():
        assert torch.allclose(g, plain_grads[name], atol=1e-4, rtol=1e-3), name


@pytest.mark.integration
def test_a_default_run_on_cuda_trains_shared_rows_on_flex_attention(tmp_path):
    """`dpo-train` with the defaults on a GPU: bf16 autocast (train.mixed_precision=auto), shared
    rows on flex_attention, kept by the start-up check; the loss stays finite."""
    run_dir = tmp_path / "run"
    args = [*QUIET, *FAST, "train.max_steps=4", f"hydra.run.dir={run_dir}"]
    done = run_cli([sys.executable, "-m", "dpo_cli", *args], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "train.mixed_precision=auto: bf16" in log, log[-3000:]
    assert "layout shared on flex_attention" in log and "agrees with padded full logits" in log, log[-3000:]
    losses = [r["loss"] for r in read_metrics(run_dir) if r.get("loss") is not None]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
