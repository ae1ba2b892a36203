"""Every layout and the chunked LM head compute what the plain padded path computes.

On a tiny random model of each supported architecture, a batch of pairs of different prompt
and response lengths is scored padded with the model's full logits (the reference path), then
with each layout the model's attention back-end supports and with the chunked head: the
per-sequence log-probs must agree within 1e-5 (plus 1e-6 relative: float32 sums of tens of
nats round at that size) and the gradients of a loss built from them
within 1e-4 of each weight tensor's largest entry (float32).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import read_metrics
from test_architectures import ARCHITECTURES
from torch.testing import assert_close

from dpo_cli.data.batching import micro_batches
from dpo_cli.data.collate import collate
from dpo_cli.errors import ConfigError
from dpo_cli.layout import Choice, attention_inputs, choose, probe, supported
from dpo_cli.lmhead import Head, chunked_logps
from dpo_cli.logprobs import KL, SHARED, WHOLE, WPO, batch_logps

VOCAB = 97


def tiny_model(arch: str, attn: str = "sdpa") -> torch.nn.Module:
    class_name, kwargs = ARCHITECTURES[arch]
    positions = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = getattr(transformers, class_name)(**{**kwargs, positions: 64}, vocab_size=VOCAB, **ids)
    for key in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    with torch.no_grad():  # tied or not, give the head weights of the size training gives them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def pairs(seed: int = 0, n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(3, VOCAB, (k,), generator=g).tolist()

    return [{"prompt_ids": ids(4 + 3 * i), "chosen_ids": ids(2 + 2 * i), "rejected_ids": ids(5 - i)} for i in range(n)]


def score(model, batch, head, extras=frozenset()):
    lp = batch_logps(model, batch, extras, head=head)
    return lp


def loss_and_grads(model, batch, head, extras=frozenset()):
    model.zero_grad()
    out = batch_logps(model, batch, extras, head=head)
    lp = out.logps
    weights = torch.arange(1, lp.chosen.numel() + 1, dtype=torch.float32)
    loss = (weights * (lp.chosen - 0.5 * lp.rejected)).sum()
    for name in ("chosen_shared", "chosen_wpo", "chosen_whole"):
        value = getattr(lp, name)
        if value is not None:
            loss = loss + 0.1 * value.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


# Gemma-2 alternates sliding-window and full-attention layers: padded only (see the refusal test).
CASES = [
    (a, layout)
    for a in ARCHITECTURES
    for layout in ("padded", "packed", "shared")
    if a != "gemma2" or layout == "padded"
]


@pytest.mark.parametrize(("arch", "layout"), CASES)
def test_layout_and_head_match_the_padded_full_logits_path(arch, layout):
    attn = "eager" if arch == "gemma2" else "sdpa"
    model = tiny_model(arch, attn)
    assert layout in supported(model.config)[0], supported(model.config)[1]
    head, why = Head.find(model, chunk=5)  # chunks smaller than the targets: several per batch
    extras = frozenset({SHARED, WPO, WHOLE})
    examples = pairs()
    plain, plain_grads = loss_and_grads(model, collate(examples, 0, layout="padded", whole=True), None, extras)
    for use_head in (None, head) if head else (None,):
        out, grads = loss_and_grads(model, collate(examples, 0, layout=layout, whole=True), use_head, extras)
        for name in ("chosen", "rejected", "chosen_tokens", "chosen_shared", "chosen_wpo", "chosen_whole"):
            assert_close(getattr(out.logps, name), getattr(plain.logps, name), atol=1e-5, rtol=1e-6), (name, use_head)
        assert_close(out.logit_sums_chosen, plain.logit_sums_chosen, atol=1e-4, rtol=1e-5)
        assert grads.keys() == plain_grads.keys()
        largest = max(float(g.abs().max()) for g in plain_grads.values())
        for name, g in grads.items():
            # Relative to the tensor's largest entry; a tensor whose gradient is zero in exact
            # arithmetic (a key bias: softmax ignores a shift) holds rounding noise only.
            scale = plain_grads[name].abs().max().clamp(min=1e-3 * largest)
            assert_close(g / scale, plain_grads[name] / scale, atol=1e-4, rtol=0), (name, use_head)
    if arch not in ("gemma2",):
        assert head is not None, why


def test_prompt_sharing_computes_each_prompt_once_and_keeps_responses_apart():
    """Two pairs under `shared`: one row per pair (prompt, chosen, rejected); position ids of
    both responses continue from the prompt; the rejected response cannot see the chosen one;
    the prompt's last position predicts the first token of both responses."""
    examples = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
        {"prompt_ids": [11, 12], "chosen_ids": [13], "rejected_ids": [14, 15, 16]},
    ]
    batch = collate(examples, pad_id=0, layout="shared")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 2, 3, 4]]
    assert batch["branch"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 2, 2, 2]]
    # Targets of pair 0: chosen 8 <- col 2, 9 <- col 3; rejected 10 <- col 2 (the prompt's last).
    first_row = batch["t_row"] == 0
    assert list(zip(batch["t_col"][first_row].tolist(), batch["t_id"][first_row].tolist(), strict=True)) == [
        (2, 8),
        (3, 9),
        (2, 10),
    ]
    assert batch["tokens"].tolist() == [2, 1, 1, 3]
    model = tiny_model("llama")
    mask = attention_inputs(batch, model)["attention_mask"][0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True]  # rejected: prompt and itself
    assert mask[4].tolist() == [True, True, True, True, True, False]  # chosen: prompt and itself


def test_packing_fills_rows_first_fit_decreasing_and_keeps_kl_rows_apart():
    """Unpaired examples of lengths 6, 3, 3 pack into two rows of capacity 6 (6 | 3 + 3), no
    padding; their KL sequences go to rows of their own, after the main rows."""
    examples = [
        {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5, 6], "label": 1},
        {"prompt_ids": [1], "completion_ids": [7, 8], "label": 0},
        {"prompt_ids": [2], "completion_ids": [9, 10], "label": 1},
    ]
    batch = collate(examples, pad_id=0, kl=True, layout="packed")
    main = ~batch["row_kl"]
    assert int(main.sum()) == 2 and batch["attention_mask"][main].all()
    assert batch["row_kl"].tolist() == [False, False, True, True, True][: len(batch["row_kl"])]
    assert (batch["role"] == KL).sum() == 3


def test_chunked_head_gradients_match_autograd_of_full_logits():
    """The hand-written backward of the chunked head equals autograd through the full logits,
    for h, W and b, chunk sizes that do and do not divide the positions."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 8, generator=g, requires_grad=True)
    w = torch.randn(13, 8, generator=g, requires_grad=True)
    b = torch.randn(13, generator=g, requires_grad=True)
    target = torch.randint(0, 13, (11,), generator=g)
    upstream = torch.randn(11, generator=g)
    full = torch.log_softmax(h @ w.t() + b, -1).gather(1, target[:, None]).squeeze(1)
    expected = torch.autograd.grad((full * upstream).sum(), (h, w, b))
    for chunk in (1, 4, 11, 64):
        got = chunked_logps(h, w, b, target, chunk)
        assert_close(got, full, atol=1e-6, rtol=0)
        grads = torch.autograd.grad((got * upstream).sum(), (h, w, b))
        for a, e in zip(grads, expected, strict=True):
            assert_close(a, e, atol=1e-5, rtol=1e-5)


LOSS_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm")


@pytest.mark.parametrize("loss", ["dpo", "kto", "orpo"])
def test_shared_chunked_run_trains_like_a_padded_full_logits_run(train_run, tmp_path, loss):
    """Six optimizer steps of the default layout (prompt-shared, packed, chunked LM head) and of
    padded rows with full logits log the same losses, rewards and gradient norms at every step
    (accumulation 2; for KTO, KL rows too; for ORPO, whole-sequence log-probs). The two runs
    share the micro batches (train.sort_by_length in both), so only the layout differs."""
    common = [
        f"loss={loss}",
        "train.max_steps=6",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "logger.log_every=1",
        "data.synthetic.num_train=64",
        "data.synthetic.num_eval=8",
    ]
    rows = {}
    for name, overrides in {
        "fast": ["train.layout=shared", "train.logits_chunk=7"],
        "plain": ["train.layout=padded", "train.logits_chunk=null"],
    }.items():
        _, run_dir = train_run(common + overrides, tmp_path / name)
        rows[name] = [r for r in read_metrics(run_dir) if "loss" in r or "eval_loss" in r]
    assert len(rows["fast"]) == len(rows["plain"]) == 7  # 6 steps and the final evaluation
    for fast, plain in zip(rows["fast"], rows["plain"], strict=True):
        for key in (k for k in fast if k in LOSS_KEYS or k.startswith("eval_")):
            assert fast[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5), (key, fast["step"])
    assert all(key in rows["fast"][-1] for key in ("eval_loss", "eval_rewards/chosen"))


def test_an_explicit_layout_the_back_end_cannot_run_is_refused():
    """Gemma-2's layers alternate sliding-window and full attention: one mask cannot serve both,
    so auto stays padded and an explicit shared layout is a config error naming what works."""
    model = tiny_model("gemma2", "eager")
    assert choose("auto", 1024, model, sharded=False).layout == "padded"
    with pytest.raises(ConfigError, match=r"train.layout=shared: not possible with this model .*use one of padded"):
        choose("shared", 1024, model, sharded=False)
    sharded = choose("auto", 1024, tiny_model("llama"), sharded=True)
    assert sharded.layout == "shared" and sharded.head is None and "sharded weights" in sharded.why


def test_the_start_up_check_rejects_a_head_that_computes_something_else(caplog):
    """A head that is not the model's (other weights) disagrees with the full logits on real
    examples: the check falls back to the same layout with full logits, and says so."""
    model = tiny_model("llama")
    good = choose("auto", 64, model, sharded=False)
    assert probe(good, model, pairs(), 0, needs_kl=False) is good
    wrong = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    bad = Choice("shared", Head(good.head.backbone, wrong, 64), good.why)
    with caplog.at_level("WARNING", logger="dpo_cli.layout"):
        chosen = probe(bad, model, pairs(), 0, needs_kl=False)
    assert chosen.layout == "shared" and chosen.head is None
    assert "start-up check rejected the faster path" in chosen.why and "off by" in caplog.text


def test_length_aware_micro_batches_keep_the_step_and_balance_processes():
    """Sorted by length and dealt round-robin: the same pairs in the step, every process a
    like amount of tokens, similar lengths in each micro batch; without lengths, slices."""
    indices = [5, 1, 7, 3, 0, 6, 2, 4]
    lengths = [10, 80, 30, 70, 20, 60, 40, 50]  # by example index
    shares = [micro_batches(indices, r, 2, 2, lengths) for r in range(2)]
    assert shares == [[[1, 5], [6, 4]], [[3, 7], [2, 0]]]  # longest first: 1, 3, 5, 7, 6, 2, 4, 0
    assert sorted(i for share in shares for mb in share for i in mb) == sorted(indices)
    assert micro_batches(indices, 1, 2, 2) == [[0, 6], [2, 4]]
