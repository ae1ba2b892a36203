"""A token-mean NLL term (RPO, SFT, CPO, ORPO, SimPO with nll_weight) is one mean over the
tokens of the whole optimizer step, however the step is split into micro batches: it used to
be a mean per micro batch, so with length-sorted micro batches the same step gave another loss
and gradient for every micro batch size (5.07035 / 5.07321 / 5.07080 in review)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config
from hydra.utils import instantiate

from dpo_cli.data.batching import micro_batches, step_indices
from dpo_cli.data.collate import chosen_token_means, collate
from dpo_cli.data.prepare import prepare
from dpo_cli.data.tokenize import example_length
from dpo_cli.logprobs import CHOSEN, WHOLE, batch_logps
from dpo_cli.losses.base import nll_shares
from dpo_cli.modeling import byte_tokenizer, load_model
from dpo_cli.reference import ModelReference
from dpo_cli.scoring import batch_loss, make_batch


def test_nll_shares_average_to_the_sum_over_the_denominator():
    logps, tokens = torch.tensor([-3.0, -5.0]), torch.tensor([2.0, 6.0])
    assert nll_shares(logps, tokens).mean() == pytest.approx(8 / 8)  # this batch's own 8 tokens
    assert nll_shares(logps, tokens, 20.0).mean() == pytest.approx(8 / 20)  # a share of a step's 20


@pytest.mark.parametrize("whole", [False, True])
def test_token_means_count_what_collate_scores(whole):
    """Paired, unpaired (undesirable: no chosen tokens) and an empty prompt (its response's
    first token is not scored)."""
    examples = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
        {"prompt_ids": [], "chosen_ids": [8, 9, 10], "rejected_ids": [11, 12]},
    ]
    unpaired = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": []},
        {"prompt_ids": [5], "chosen_ids": [], "rejected_ids": [7, 8]},
    ]
    for batch_examples in (examples, unpaired):
        batch = collate(batch_examples, 0, whole=whole)
        chosen = batch["role"] == CHOSEN
        if whole:  # every target of a chosen sequence
            counted = torch.bincount(batch["t_seq"], minlength=len(chosen)).float()[chosen].sum()
        else:
            counted = batch["tokens"][chosen].sum()
        assert chosen_token_means(batch_examples)[int(whole)] * len(batch_examples) == counted


def _step_loss_and_grad(loss_name: str, micro: int) -> tuple[float, torch.Tensor]:
    """One optimizer step of 12 pairs as the loop runs it on one process: length-sorted micro
    batches of `micro`, each micro batch's loss divided by their number (accelerate's
    accumulation), gradients summed."""
    cfg = make_config([f"loss={loss_name}", "data.format.num_train=64", "data.format.num_eval=8"])
    tokenizer = byte_tokenizer()
    data = prepare(cfg.data, tokenizer, 0).train
    model = load_model(cfg.model, tokenizer, 0)
    loss_fn = instantiate(cfg.loss)
    reference = ModelReference(load_model(cfg.model, tokenizer, 0), "ref") if loss_fn.requires_reference else None
    with torch.no_grad():  # move the policy away from the reference, so that the DPO part is not constant
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    indices = step_indices(0, len(data), 12, 0)
    shards = micro_batches(indices, 0, 1, micro, [example_length(ex) for ex in data])
    means = chosen_token_means([data[i] for i in indices])
    total = 0.0
    for idx in shards:
        batch = make_batch(data, idx, tokenizer.pad_token_id, loss_fn, "cpu", "padded")
        loss, _ = batch_loss(model, reference, loss_fn, batch, token_means=means)
        (loss / len(shards)).backward()
        total += float(loss.detach()) / len(shards)
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return total, grad


@pytest.mark.parametrize("loss_name", ["rpo", "sft", "cpo", "orpo"])
def test_a_step_gives_one_loss_and_gradient_for_any_micro_batch(loss_name):
    base_loss, base_grad = _step_loss_and_grad(loss_name, 12)
    for micro in (3, 4):
        loss, grad = _step_loss_and_grad(loss_name, micro)
        assert loss == pytest.approx(base_loss, rel=1e-6), (loss_name, micro)
        torch.testing.assert_close(grad, base_grad, rtol=1e-5, atol=1e-7)


def test_whole_sequence_nll_uses_the_whole_step():
    """ORPO's NLL over prompt and response tokens: its denominator is the step's whole tokens."""
    cfg = make_config(["loss=orpo"])
    tokenizer = byte_tokenizer()
    data = prepare(cfg.data, tokenizer, 0).train[:4]
    model = load_model(cfg.model, tokenizer, 0)
    batch = make_batch(data, [0, 1], tokenizer.pad_token_id, instantiate(cfg.loss), "cpu")
    lp = batch_logps(model, batch, frozenset({WHOLE})).logps
    means = chosen_token_means(data)
    _, parts = batch_loss(model, None, instantiate(cfg.loss), batch, token_means=means)
    nll_sum, count = parts["nll_loss"]
    assert float(nll_sum / count) == pytest.approx(float(-lp["chosen"].whole.sum() / (2 * means[1])), rel=1e-6)
