"""sequence_logps and batch_logps on examples small enough to do by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch.testing import assert_close

from dpo_cli.data.collate import collate
from dpo_cli.logprobs import CHOSEN, IGNORE_INDEX, KL, REJECTED, SHARED, WHOLE, WPO, batch_logps, sequence_logps

# One sequence of 4 positions over a vocabulary of 3. The logits are log-probabilities, so
# log_softmax returns them unchanged and every expected value is the log of a number below.
PROBS = torch.tensor(
    [
        [0.1, 0.2, 0.7],  # position 0: predicts token 1
        [0.6, 0.3, 0.1],  # position 1: predicts token 2
        [0.25, 0.25, 0.5],  # position 2: predicts token 3
        [0.4, 0.4, 0.2],  # position 3: predicts nothing (no token 4)
    ]
)
LOGITS = PROBS.log().unsqueeze(0)  # (1, 4, 3)


def test_label_shift_and_prompt_mask():
    """Token 0 is the prompt, tokens 1 and 2 the response, token 3 padding.

    labels = [-100, 2, 0, -100]
    logits[0] predicts labels[1] = 2: p = 0.7
    logits[1] predicts labels[2] = 0: p = 0.6
    logits[2] predicts labels[3] = -100: ignored; logits[3] is never used
    logp = log 0.7 + log 0.6 = log 0.42, over 2 tokens.
    Without the shift it would be log 0.1 + log 0.25 (logits[1][2], logits[2][0]).
    """
    labels = torch.tensor([[IGNORE_INDEX, 2, 0, IGNORE_INDEX]])
    logp, n = sequence_logps(LOGITS, labels)
    assert logp.shape == (1,) and n.shape == (1,)
    assert_close(logp, torch.tensor([math.log(0.42)]))
    assert_close(n, torch.tensor([2.0]))


def test_masked_positions_do_not_count():
    """Unmasking the padding position adds logits[2] -> token 1 (p = 0.25) and one token;
    masking the first response token removes log 0.7 and one token."""
    unmasked = torch.tensor([[IGNORE_INDEX, 2, 0, 1]])
    logp, n = sequence_logps(LOGITS, unmasked)
    assert_close(logp, torch.tensor([math.log(0.42 * 0.25)]))
    assert_close(n, torch.tensor([3.0]))

    longer_prompt = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX]])
    logp, n = sequence_logps(LOGITS, longer_prompt)
    assert_close(logp, torch.tensor([math.log(0.6)]))
    assert_close(n, torch.tensor([1.0]))

    # The label at position 0 has nothing predicting it: it never counts, masked or not.
    first_labelled = torch.tensor([[1, 2, 0, IGNORE_INDEX]])
    logp, n = sequence_logps(LOGITS, first_labelled)
    assert_close(logp, torch.tensor([math.log(0.42)]))
    assert_close(n, torch.tensor([2.0]))


def test_all_masked_gives_zero():
    logp, n = sequence_logps(LOGITS, torch.full((1, 4), IGNORE_INDEX))
    assert_close(logp, torch.tensor([0.0]))
    assert_close(n, torch.tensor([0.0]))


def test_rows_are_independent():
    """Two rows with different labels over the same logits give each row's own sum."""
    logits = LOGITS.expand(2, 4, 3)
    labels = torch.tensor([[IGNORE_INDEX, 2, 0, IGNORE_INDEX], [IGNORE_INDEX, 0, 1, 2]])
    logp, n = sequence_logps(logits, labels)
    # Row 1: logits[0] -> 0 (0.1), logits[1] -> 1 (0.3), logits[2] -> 2 (0.5).
    assert_close(logp, torch.tensor([math.log(0.42), math.log(0.1 * 0.3 * 0.5)]))
    assert_close(n, torch.tensor([2.0, 3.0]))


def test_bf16_logits_give_float32_computed_in_float32():
    """bf16 logits give float32 outputs equal to the float32 computation on the same (rounded)
    logits: the cast happens before the log-softmax. A log-softmax in bf16 over a large
    vocabulary is off by ~1e-2 per token, far outside the tolerance below."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 6, 32000, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 32000, (2, 6), generator=g)
    labels[:, :2] = IGNORE_INDEX
    logp, n = sequence_logps(logits, labels)
    assert logp.dtype == torch.float32 and n.dtype == torch.float32
    ref_logp, ref_n = sequence_logps(logits.float(), labels)
    assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    assert_close(n, torch.tensor([4.0, 4.0]))
    # Sanity check that the tolerance can tell: the same sum done in bf16 is visibly off.
    in_bf16 = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    in_bf16 = (in_bf16.float() * (labels[:, 1:] != IGNORE_INDEX)).sum(-1)
    assert (in_bf16 - ref_logp).abs().max() > 1e-3


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM that returns fixed logits and records what it was called with."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache})
        return SimpleNamespace(logits=self.logits)


def test_batch_logps_groups_rows_by_role():
    """B = 2 pairs, so rows 0 and 1 are chosen, rows 2 and 3 rejected. T = 5, V = 3.

    Row r has r + 1 response tokens at the end of the row and constant logits c_r at the
    positions that predict them (uniform: log p = -log 3 per token); every other position
    holds 100 (also uniform, but it would move the mean logit if it were counted).
        logps:       -(r + 1) log 3  ->  chosen [-log 3, -2 log 3], rejected [-3 log 3, -4 log 3]
        tokens:      r + 1           ->  chosen [1, 2], rejected [3, 4]
        logit sums:  (r + 1) c_r     ->  chosen [c_0, 2 c_1], rejected [3 c_2, 4 c_3]
    (TRL's logits/chosen is then sum of logit sums / sum of tokens: token-weighted.)
    """
    b, t, v = 2, 5, 3
    c = [1.0, -2.0, 3.0, 0.5]
    logits = torch.full((2 * b, t, v), 100.0)
    labels = torch.full((2 * b, t), IGNORE_INDEX)
    for r in range(2 * b):
        n_resp = r + 1
        labels[r, t - n_resp :] = 1
        logits[r, t - n_resp - 1 : t - 1] = c[r]
    batch = {
        "input_ids": torch.arange(2 * b * t).reshape(2 * b, t),
        "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
        "labels": labels,
        "role": torch.tensor([CHOSEN, CHOSEN, REJECTED, REJECTED]),
        "shared_tokens": torch.tensor([1, 2, 1, 2]),
    }
    model = FixedLogits(logits)
    out = batch_logps(model, batch)

    assert len(model.calls) == 1, "chosen and rejected rows go through one forward pass"
    assert model.calls[0]["input_ids"] is batch["input_ids"], "no copy of the batch without KL rows"
    assert model.calls[0]["attention_mask"] is batch["attention_mask"]
    log3 = math.log(3)
    assert_close(out.logps["chosen"].logps, torch.tensor([-log3, -2 * log3]))
    assert_close(out.logps["rejected"].logps, torch.tensor([-3 * log3, -4 * log3]))
    assert_close(out.logps["chosen"].tokens, torch.tensor([1.0, 2.0]))
    assert_close(out.logps["rejected"].tokens, torch.tensor([3.0, 4.0]))
    assert_close(out.logit_sums_chosen, torch.tensor([c[0], 2 * c[1]]))
    assert_close(out.logit_sums_rejected, torch.tensor([3 * c[2], 4 * c[3]]))
    assert "kl" not in out.logps and out.logps["chosen"].shared is None and out.logps["chosen"].wpo is None


class BigramLM(torch.nn.Module):
    """A causal LM whose next-token distribution depends only on the current token:
    logits[t] = log P[input_ids[t]], so every log-prob below is the log of a table entry."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.log_probs = torch.nn.Parameter(probs.log())
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        self.calls += 1
        return SimpleNamespace(logits=self.log_probs[input_ids])


# P[current token] -> distribution over the next token (vocabulary of 4).
BIGRAM = torch.tensor(
    [
        [0.1, 0.2, 0.3, 0.4],
        [0.5, 0.25, 0.125, 0.125],
        [0.25, 0.25, 0.25, 0.25],
        [0.4, 0.3, 0.2, 0.1],
    ]
)


def test_kl_rows_are_scored_without_gradients_in_a_second_pass():
    """Two unpaired examples, prompt [0] each: desirable completion [1, 2], undesirable [3].

    Rows: CHOSEN [0, 1, 2], REJECTED [0, 3], then KL rows (prompt j + response of j - 1):
    KL 0 = [0] + [3], KL 1 = [0] + [1, 2].
        chosen   log P[0][1] + log P[1][2] = log 0.2 + log 0.125 = log 0.025
        rejected log P[0][3] = log 0.4
        kl       [log 0.4, log 0.025]
    """
    examples = [
        {"prompt_ids": [0], "chosen_ids": [1, 2], "rejected_ids": []},
        {"prompt_ids": [0], "chosen_ids": [], "rejected_ids": [3]},
    ]
    batch = collate(examples, pad_id=0, kl=True)
    assert batch["role"].tolist() == [CHOSEN, REJECTED, KL, KL]
    model = BigramLM(BIGRAM)
    out = batch_logps(model, batch)
    assert model.calls == 2
    assert_close(out.logps["chosen"].logps, torch.tensor([math.log(0.025)]))
    assert_close(out.logps["rejected"].logps, torch.tensor([math.log(0.4)]))
    assert_close(out.logps["kl"].logps, torch.tensor([math.log(0.4), math.log(0.025)]))
    assert out.logps["chosen"].logps.requires_grad and not out.logps["kl"].logps.requires_grad


def test_shared_and_wpo_extras():
    """One pair, prompt [0]; chosen [1, 2, 3], rejected [3]: the shared length is 1.

        chosen tokens: P[0][1] = 0.2, P[1][2] = 0.125, P[2][3] = 0.25
        chosen_shared = log 0.2 (first token only); rejected_shared = rejected = log P[0][3] = log 0.4
    WPO aligns each token by log sum_v p(v)^2 at its position:
        row 0: 0.01 + 0.04 + 0.09 + 0.16 = 0.3;  row 1: 0.25 + 0.0625 + 2 * 0.015625 = 0.34375
        row 2: 4 * 0.0625 = 0.25
        chosen_wpo = mean(log 0.2 - log 0.3, log 0.125 - log 0.34375, log 0.25 - log 0.25)
        rejected_wpo = log 0.4 - log 0.3
    """
    batch = collate([{"prompt_ids": [0], "chosen_ids": [1, 2, 3], "rejected_ids": [3]}], pad_id=0)
    assert batch["shared_tokens"].tolist() == [1, 1]
    out = batch_logps(BigramLM(BIGRAM), batch, frozenset({SHARED, WPO})).logps
    assert_close(out["chosen"].shared, torch.tensor([math.log(0.2)]))
    assert_close(out["rejected"].shared, torch.tensor([math.log(0.4)]))
    ln = math.log
    expected = (ln(0.2 / 0.3) + ln(0.125 / 0.34375) + ln(0.25 / 0.25)) / 3
    assert_close(out["chosen"].wpo, torch.tensor([expected]))
    assert_close(out["rejected"].wpo, torch.tensor([ln(0.4 / 0.3)]))
    assert not out["chosen"].wpo.requires_grad


def test_whole_sequence_extra_counts_prompt_tokens_but_not_the_first_or_padding():
    """One pair, prompt [0, 1]; chosen [2], rejected [3, 0] (padding after the chosen row).

    chosen response: log P[1][2] = log 0.125 (1 token)
    chosen whole:    log P[0][1] + log P[1][2] = log 0.2 + log 0.125 = log 0.025 (2 tokens;
                     token 0 has nothing predicting it, the padding is not a token)
    """
    batch = collate([{"prompt_ids": [0, 1], "chosen_ids": [2], "rejected_ids": [3, 0]}], pad_id=0, whole=True)
    out = batch_logps(BigramLM(BIGRAM), batch, frozenset({WHOLE})).logps
    assert_close(out["chosen"].logps, torch.tensor([math.log(0.125)]))
    assert_close(out["chosen"].whole, torch.tensor([math.log(0.025)]))
    assert_close(out["chosen"].whole_tokens, torch.tensor([2.0]))
    plain = batch_logps(BigramLM(BIGRAM), batch).logps
    assert_close(plain["chosen"].logps, out["chosen"].logps)
    assert_close(plain["rejected"].logps, out["rejected"].logps)


def test_an_overflowed_logit_at_a_masked_position_changes_nothing():
    """fp16 overflow at padding or prompt positions (inf or NaN logits there) must not reach
    the sequence log-prob or its gradient: masked positions contribute nothing at all."""
    from dpo_cli.logprobs import IGNORE_INDEX, sequence_logps

    torch.manual_seed(0)
    clean = torch.randn(2, 5, 7)
    labels = torch.tensor([[0, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 6]])
    broken = clean.clone()
    broken[0, 3:, :] = float("inf")  # logits[:, t] predict label t + 1: positions 3, 4 are unused in row 0
    broken[1, 0, :] = float("nan")  # predicts a prompt token
    broken.requires_grad_(True)
    logps, n = sequence_logps(broken, labels)
    expected, _ = sequence_logps(clean, labels)
    assert torch.equal(logps, expected) and n.tolist() == [2.0, 3.0]
    logps.sum().backward()
    assert torch.isfinite(broken.grad).all()
    assert (broken.grad[0, 3:] == 0).all() and (broken.grad[1, 0] == 0).all()
