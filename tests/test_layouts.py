"""Every layout and the chunked LM head compute what the plain padded path computes.

On a tiny random model of each supported architecture, a batch of pairs of different prompt
and response lengths is scored padded with the model's full logits (the reference path), then
with each layout the model's attention back-end supports and with the chunked head: the
per-sequence log-probs must agree within 1e-5 (plus 1e-6 relative: float32 sums of tens of
nats round at that size) and the gradients of a loss built from them
within 1e-4 of each weight tensor's largest entry (float32).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

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


def tiny_model(arch: str, attn: str | None = "sdpa", **sizes) -> torch.nn.Module:
    """A tiny random `arch` model (eval mode) with back-end `attn` (None: the best it supports);
    `sizes` change its config's kwargs."""
    class_name, kwargs = ARCHITECTURES[arch]
    kwargs = {**kwargs, **sizes}
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
    weights = torch.arange(1, lp["chosen"].logps.numel() + 1, dtype=torch.float32)
    loss = (weights * (lp["chosen"].logps - 0.5 * lp["rejected"].logps)).sum()
    for value in (lp["chosen"].shared, lp["chosen"].wpo, lp["chosen"].whole):
        if value is not None:
            loss = loss + 0.1 * value.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


# Gemma-2 alternates sliding-window and full-attention layers; Bloom and Falcon(alibi) take
# their position biases from the row, not from position ids: padded only (see the refusal tests).
# GPT-Neo's local layers apply their window by column: no prompt sharing.
PADDED_ONLY = ("gemma2", "bloom", "falcon_alibi")
CASES = [
    (a, layout)
    for a in ARCHITECTURES
    for layout in ("padded", "packed", "shared")
    if (a not in PADDED_ONLY or layout == "padded") and (a != "gpt_neo" or layout != "shared")
]


@pytest.mark.parametrize(("arch", "layout"), CASES)
def test_layout_and_head_match_the_padded_full_logits_path(arch, layout):
    model = tiny_model(arch, None)  # the back-end each model gets by default (eager for Gemma-2 and Bloom)
    assert layout in supported(model)[0], supported(model)[1]
    head, why = Head.find(model, chunk=5)  # chunks smaller than the targets: several per batch
    extras = frozenset({SHARED, WPO, WHOLE})
    examples = pairs()
    plain, plain_grads = loss_and_grads(model, collate(examples, 0, layout="padded", whole=True), None, extras)
    for use_head in (None, head) if head else (None,):
        out, grads = loss_and_grads(model, collate(examples, 0, layout=layout, whole=True), use_head, extras)
        for role in ("chosen", "rejected"):
            for kind in ("logps", "tokens", "shared", "wpo", "whole", "whole_tokens"):
                want, got = getattr(plain.logps[role], kind), getattr(out.logps[role], kind)
                assert (want is None) == (got is None) == (role == "rejected" and kind.startswith("whole"))
                if want is not None:
                    assert_close(got, want, atol=1e-5, rtol=1e-6), (role, kind, use_head)
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
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6], "rejected_ids": []},
        {"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [7, 8]},
        {"prompt_ids": [2], "chosen_ids": [9, 10], "rejected_ids": []},
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


@pytest.mark.integration
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
        "data.format.num_train=64",
        "data.format.num_eval=8",
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


def _refusal(model: torch.nn.Module, layout: str) -> str:
    with pytest.raises(ConfigError) as info:
        choose(layout, 1024, model, sharded=False)
    (message,) = info.value.problems
    return message


def test_an_explicit_layout_the_back_end_cannot_run_is_refused_naming_fixes_that_work():
    """Gemma-2's layers alternate sliding-window and full attention: one mask cannot serve both,
    so auto stays padded and an explicit shared layout is a config error naming what works:
    padded or auto, and no attention back-end (Gemma-2 has no sdpa, and none would help).
    Each fix a refusal names is then tried on the same model."""
    model = tiny_model("gemma2", None)
    assert choose("auto", 1024, model, sharded=False).layout == "padded"
    message = _refusal(model, "shared")
    assert message.startswith("train.layout=shared: not possible with this model (its layers mix attention kinds")
    assert message.endswith("use train.layout=padded or train.layout=auto") and "attn_implementation" not in message
    for fix in ("padded", "auto"):
        assert choose(fix, 1024, model, sharded=False).layout == "padded"
    # Where the back-end is the reason (a custom kernel, given no packed-sequence mask),
    # switching it is a fix, and it works.
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("custom_kernel", sdpa_attention_forward)
    custom = _refusal(tiny_model("llama", "custom_kernel"), "shared")
    assert custom.endswith("use train.layout=padded or train.layout=auto, or model.attn_implementation=sdpa"), custom
    assert choose("shared", 1024, tiny_model("llama", "sdpa"), sharded=False).layout == "shared"
    sharded = choose("auto", 1024, tiny_model("llama"), sharded=True)
    assert sharded.layout == "shared" and sharded.head is None and "sharded weights" in sharded.why


def test_the_start_up_check_rejects_a_head_that_computes_something_else(caplog):
    """A head that is not the model's (other weights) disagrees with the full logits on real
    examples: the check falls back to the same layout with full logits, and says so."""
    model = tiny_model("llama")
    good = choose("auto", 64, model, sharded=False)
    assert probe(good, model, pairs(), 0) is good
    wrong = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    bad = Choice("shared", Head(good.head.backbone, wrong, 64), good.why)
    with caplog.at_level("WARNING", logger="dpo_cli.layout"):
        chosen = probe(bad, model, pairs(), 0)
    assert chosen.layout == "shared" and chosen.head is None
    assert "start-up check rejected the faster path" in chosen.why and "off by" in caplog.text


@pytest.mark.parametrize("arch", ["bloom", "falcon_alibi"])
def test_alibi_models_get_padded_rows_and_refuse_packed_ones(arch, caplog):
    """ALiBi biases come from each row's padding mask (Bloom takes no position ids; Falcon
    ignores them with alibi=True), so positions cannot restart per packed sequence: auto picks
    padded, which the start-up check finds exact, and an explicit packed layout is refused
    naming what works. Once this crashed inside the start-up check (too many values to unpack)."""
    model = tiny_model(arch, None)
    choice = choose("auto", 64, model, sharded=False)
    assert choice.layout == "padded" and "position ids" in choice.why, choice.why
    with caplog.at_level("WARNING", logger="dpo_cli.layout"):
        assert probe(choice, model, pairs(n=4), 0, frozenset({SHARED, WPO, WHOLE})) is choice
    assert not caplog.records
    for layout in ("packed", "shared"):
        message = _refusal(model, layout)
        assert "position ids" in message and message.endswith("use train.layout=padded or train.layout=auto"), message
    assert choose("padded", 64, model, sharded=False).layout == "padded"


def test_a_candidate_path_that_raises_falls_back_with_a_warning(caplog):
    """Whatever a candidate path raises (here Bloom, forced into shared rows, fails inside its
    ALiBi code), the start-up check warns and falls back; it never ends the run."""
    model = tiny_model("bloom", None)
    forced = Choice("shared", None, "forced for the test")
    with caplog.at_level("WARNING", logger="dpo_cli.layout"):
        chosen = probe(forced, model, pairs(n=4), 0)
    assert chosen.layout == "padded" and chosen.head is None
    assert "layout shared, full logits failed (ValueError" in caplog.text, caplog.text


@dataclass
class HalfGradient(Head):
    """The model's own head with the exact values, but only half the gradient reaches the
    layers below it (as a custom backward with a wrong factor)."""

    @contextmanager
    def capture(self):
        with super().capture() as hidden:
            yield lambda: hidden().detach() + 0.5 * (hidden() - hidden().detach())


@dataclass
class FirstColumnWrong(Head):
    """The model's own head, but the hidden state at column 0 is off: what column 0 predicts is
    a prompt token, scored only for whole-sequence log-probs (ORPO's NLL)."""

    @contextmanager
    def capture(self):
        with super().capture() as hidden:

            def off() -> torch.Tensor:
                h = hidden()
                first = torch.arange(h.shape[1], device=h.device) == 0
                return h + first[None, :, None].to(h.dtype)

            yield off


def _broken(model: torch.nn.Module, kind: type) -> Choice:
    good = choose("auto", 64, model, sharded=False)
    assert good.layout == "shared" and good.head is not None
    return Choice("shared", kind(good.head.backbone, good.head.linear, 64), good.why)


def test_the_start_up_check_scores_the_longest_examples_not_the_first_ones(caplog):
    """GPT-Neo's local layers apply their 16-token window by column, so prompt sharing (which
    `auto` does not pick for it) is exact on rows that fit in the window and wrong on longer
    ones. Forced on it, the check passes on the first two examples (short ones: all it used to
    score) and catches it on the whole set, where it scores the longest, the shortest and two
    between, in micro batches as training makes them."""
    model = tiny_model("gpt_neo", None)
    assert choose("auto", 64, model, sharded=False).layout == "packed"
    assert "local-attention layers apply their window by column" in _refusal(model, "shared")
    g = torch.Generator().manual_seed(3)

    def pair(*lengths: int) -> dict:
        keys = ("prompt_ids", "chosen_ids", "rejected_ids")
        return {k: torch.randint(3, VOCAB, (n,), generator=g).tolist() for k, n in zip(keys, lengths, strict=True)}

    data = [pair(3, 2, 2), pair(4, 3, 3), pair(10, 8, 6), pair(12, 10, 8), pair(14, 12, 10)]  # 7 ... 36 tokens
    forced = Choice("shared", None, "forced for the test")
    assert probe(forced, model, data[:2], 0) is forced  # exact on the first two examples
    with caplog.at_level("WARNING", logger="dpo_cli.layout"):
        chosen = probe(forced, model, data, 0, micro=2)
    assert chosen.layout == "padded", chosen
    assert "layout shared, full logits rejected.logps off by" in caplog.text, caplog.text


def test_the_start_up_check_compares_gradients(caplog):
    """A path whose log-probs are exact but whose gradient is not (half of it is lost below the
    head) is caught by comparing the gradient of one micro batch with the plain path's."""
    model = tiny_model("llama")
    bad = _broken(model, HalfGradient)
    with caplog.at_level("WARNING", logger="dpo_cli.layout"):
        chosen = probe(bad, model, pairs(n=4), 0)
    assert chosen.layout == "shared" and chosen.head is None, chosen
    assert "gradient off by" in caplog.text, caplog.text
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradients behind


def test_the_start_up_check_compares_the_extras_the_loss_asks_for(caplog):
    """A path wrong only where whole-sequence log-probs are scored (prompt tokens) passes for a
    loss that does not ask for them and is caught for one that does (ORPO's NLL, WHOLE)."""
    model = tiny_model("llama")
    bad = _broken(model, FirstColumnWrong)
    assert probe(bad, model, pairs(n=4), 0, frozenset({SHARED, WPO})) is bad
    with caplog.at_level("WARNING", logger="dpo_cli.layout"):
        chosen = probe(bad, model, pairs(n=4), 0, frozenset({WHOLE}))
    assert chosen.head is None, chosen
    assert "chosen.whole off by" in caplog.text, caplog.text


def test_length_aware_micro_batches_keep_the_step_and_balance_processes():
    """Sorted by length and dealt round-robin: the same pairs in the step, every process a
    like amount of tokens, similar lengths in each micro batch; without lengths, slices."""
    indices = [5, 1, 7, 3, 0, 6, 2, 4]
    lengths = [10, 80, 30, 70, 20, 60, 40, 50]  # by example index
    shares = [micro_batches(indices, r, 2, 2, lengths) for r in range(2)]
    assert shares == [[[1, 5], [6, 4]], [[3, 7], [2, 0]]]  # longest first: 1, 3, 5, 7, 6, 2, 4, 0
    assert sorted(i for share in shares for mb in share for i in mb) == sorted(indices)
    assert micro_batches(indices, 1, 2, 2) == [[0, 6], [2, 4]]
