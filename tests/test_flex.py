"""The FlexAttention path for packed and shared rows, as far as a CPU can show it.

The block mask and the dense masks come from one rule (`attention.mask_rule`); here that rule
is checked against the mask written out by hand, the BlockMask against the rule block by block
(a block is skipped exactly when no query in it may see any key in it), and a model running
flex_attention against padded rows (forward only: PyTorch's FlexAttention has no CPU backward).
Gradients and bf16 on a GPU: tests/test_gpu.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_layouts import VOCAB, pairs, tiny_model
from torch.nn.attention.flex_attention import create_mask

from dpo_cli.attention import attention_inputs, block_mask, dense_mask, mask_rule, use_attention
from dpo_cli.data.collate import collate
from dpo_cli.layout import choose, probe, supported
from dpo_cli.logprobs import batch_logps


def by_hand(segment: torch.Tensor, branch: torch.Tensor, position: torch.Tensor, window: int | None) -> torch.Tensor:
    """The mask of a packed batch, one (row, query, key) at a time."""
    rows, length = segment.shape
    out = torch.zeros(rows, length, length, dtype=torch.bool)
    for b in range(rows):
        for q in range(length):
            for k in range(length):
                same = bool(segment[b, q] == segment[b, k])
                prompt_or_own = int(branch[b, k]) == 0 or int(branch[b, k]) == int(branch[b, q])
                near = window is None or int(position[b, q] - position[b, k]) < window
                out[b, q, k] = (k <= q and same and prompt_or_own and near) or q == k
    return out


def long_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs long enough that a packed row spans several 128-token blocks."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(3, VOCAB, (k,), generator=g).tolist()

    longest = {"prompt_ids": ids(200), "chosen_ids": ids(150), "rejected_ids": ids(160)}
    return [longest] + [
        {"prompt_ids": ids(20 + 9 * i), "chosen_ids": ids(15 + 7 * i), "rejected_ids": ids(30 - 2 * i)}
        for i in range(n)
    ]


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("window", [None, 3])
def test_the_mask_rule_is_the_mask_written_out_by_hand(layout, window):
    """Dense masks (sdpa, eager) and FlexAttention's view of the rule equal the mask built one
    entry at a time: causal, within a sequence, a response sees its prompt and itself only,
    within the sliding window; every position sees itself (padding rows are never empty)."""
    batch = collate(pairs(n=4), pad_id=0, layout=layout)
    segment, branch, position = batch["segment"], batch["branch"], batch["position_ids"]
    want = by_hand(segment, branch, position, window)
    assert torch.equal(dense_mask(segment, branch, position, window), want)
    rows, length = segment.shape
    flex_view = create_mask(mask_rule(segment, branch, position, window), rows, 1, length, length, device="cpu")
    assert torch.equal(flex_view[:, 0], want)
    if layout == "shared":
        assert not want.all(-1).any()  # the two responses do not see each other: something is masked per row


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_the_block_mask_lists_exactly_the_blocks_with_a_visible_key_and_skips_the_rest(layout):
    """A BlockMask (128 x 128 blocks) from the rule computes a block iff some query in it may
    see some key in it, and marks it full iff every query sees every key; other sequences of a
    packed row, and the blocks above the diagonal, are skipped."""
    batch = collate(long_pairs(6), pad_id=0, layout=layout)
    segment, branch, position = batch["segment"], batch["branch"], batch["position_ids"]
    rows, length = segment.shape
    assert length > 2 * 128, length
    mask = block_mask(segment, branch, position, None)
    assert mask.shape == (rows, 1, length, length)
    size = 128
    blocks = -(-length // size)
    dense = torch.zeros(rows, blocks * size, blocks * size, dtype=torch.bool)
    dense[:, :length, :length] = dense_mask(segment, branch, position, None)
    per_block = dense.view(rows, blocks, size, blocks, size)
    any_visible = per_block.any(4).any(2)
    computed = mask.to_dense()[:, 0].bool()
    assert torch.equal(computed, any_visible)
    causal_blocks = rows * blocks * (blocks + 1) // 2
    assert int(computed.sum()) < causal_blocks  # masked blocks are skipped, not computed and discarded
    full = torch.zeros(rows, blocks, blocks, dtype=torch.bool)
    for b in range(rows):
        for q in range(blocks):
            n = int(mask.full_kv_num_blocks[b, 0, q])
            full[b, q, mask.full_kv_indices[b, 0, q, :n].long()] = True
    assert torch.equal(full, per_block.all(4).all(2))  # full: every query of the block sees every key


@pytest.mark.parametrize("window", [None, 3])
def test_flex_attention_with_the_block_mask_equals_sdpa_with_the_dense_mask(window):
    """The attention op itself (FlexAttention's unfused CPU forward, which applies the rule at
    every position: the block lists are checked above and by the compiled kernel below) equals
    sdpa on the dense mask, for packed and shared rows, with and without a sliding window."""
    from torch.nn.attention.flex_attention import flex_attention

    for layout in ("packed", "shared"):
        batch = collate(long_pairs(5), pad_id=0, layout=layout)
        segment, branch, position = batch["segment"], batch["branch"], batch["position_ids"]
        rows, length = segment.shape
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(rows, 2, length, 8, generator=g) for _ in range(3))
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=dense_mask(segment, branch, position, window)[:, None]
        )
        got = flex_attention(q, k, v, block_mask=block_mask(segment, branch, position, window))
        assert (got - want).abs().max() < 1e-5, (layout, window)


@pytest.mark.integration  # compiles FlexAttention for the CPU (about 20 s)
def test_a_model_on_flex_attention_scores_packed_and_shared_rows_as_padded_ones():
    """Log-probs (forward; no CPU backward exists) of packed and shared rows through a Llama on
    flex_attention, with the block mask, equal padded rows on sdpa within 1e-5 per scored token
    (float32). (A sliding-window model, whose mask reads positions too, hits a C++ code
    generation error of inductor's CPU FlexAttention template in torch 2.13; the GPU test runs it.)"""
    model = tiny_model("llama", "sdpa")
    examples = long_pairs(3)  # rows of several 128-token blocks: skipped, full and partial ones
    with torch.no_grad():
        plain = batch_logps(model, collate(examples, 0, layout="padded"), stats=False).logps
        with use_attention(model, "flex_attention"):
            assert model.config._attn_implementation == "flex_attention"
            for layout in ("packed", "shared"):
                batch = collate(examples, 0, layout=layout)
                assert type(attention_inputs(batch, model)["attention_mask"]).__name__ == "BlockMask"
                got = batch_logps(model, batch, stats=False).logps
                for role in ("chosen", "rejected"):
                    tokens = plain[role].tokens
                    diff = (got[role].logps - plain[role].logps).abs()
                    assert bool((diff <= 1e-5 * tokens.clamp(min=1)).all()), (layout, role, diff)
    assert model.config._attn_implementation == "sdpa"  # switched back


def test_auto_puts_packed_and_shared_rows_on_flex_attention_on_cuda_only_where_it_can():
    """On CUDA (here declared: cuda=True) with model.attn_implementation null, auto picks
    flex_attention for packed and shared rows of a model that supports it; not on a CPU, not
    when the user named a back-end, not for padded rows, not for a model without flex support
    (GPT-2), and not with attention dropout on (flex_attention has none)."""
    llama = tiny_model("llama", "sdpa")
    flex = choose("auto", 64, llama, sharded=False, auto_attention=True, cuda=True)
    assert flex.layout == "shared" and flex.attention == "flex_attention", flex.why
    assert "layout shared on flex_attention" in flex.describe()
    assert choose("auto", 64, llama, False, auto_attention=True, cuda=False).attention is None
    assert choose("auto", 64, llama, False, auto_attention=False, cuda=True).attention is None
    padded = choose("padded", 64, llama, False, auto_attention=True, cuda=True)
    assert padded.attention is None
    gpt2 = choose("auto", 64, tiny_model("gpt2", "sdpa"), False, auto_attention=True, cuda=True)
    assert gpt2.attention is None and "GPT2LMHeadModel does not support flex_attention" in gpt2.why
    llama.config.attention_dropout = 0.1
    dropout = choose("auto", 64, llama, False, auto_attention=True, cuda=True)
    assert dropout.attention is None and "attention dropout" in dropout.why
    assert supported(tiny_model("llama", "flex_attention"))[0] == ("shared", "packed", "padded")


def test_the_start_up_check_falls_back_from_flex_attention_to_the_models_own_back_end(caplog):
    """A flex_attention path that fails the start-up check (here: no CPU backward for the
    gradient check) falls back to the same layout and head on the model's own back-end, says
    so, and leaves the model on that back-end."""
    model = tiny_model("llama", "sdpa")
    flex = choose("auto", 64, model, sharded=False, auto_attention=True, cuda=True)
    with caplog.at_level(logging.WARNING, logger="dpo_cli.layout"):
        chosen = probe(flex, model, pairs(n=4), 0)
    assert (chosen.layout, chosen.attention) == ("shared", None) and chosen.head is not None
    assert "the chunked head on flex_attention failed" in caplog.text, caplog.text
    assert model.config._attn_implementation == "sdpa"


def test_generation_runs_on_sdpa_where_training_rows_run_on_flex_attention():
    """Generation decodes from a KV cache, with no packed rows: a model switched to
    flex_attention for training generates on sdpa where it has it; others on their own."""
    from dpo_cli.attention import generation_attention

    assert generation_attention(tiny_model("llama", "flex_attention")) == "sdpa"
    assert generation_attention(tiny_model("llama", "sdpa")) == "sdpa"
    assert generation_attention(tiny_model("gpt2", "eager")) == "eager"
