"""Throughput metrics: training time only (not evaluation or checkpoints), the padding share of
the computed positions, and MFU under the stated FLOP formula."""

from __future__ import annotations

import time

import pytest
from conftest import REPO, make_config, read_metrics
from hydra.utils import instantiate

from dpo_cli import train
from dpo_cli.data.batching import micro_batches, step_indices
from dpo_cli.data.prepare import prepare
from dpo_cli.data.tokenize import example_length
from dpo_cli.evaluate import make_batch
from dpo_cli.modeling import byte_tokenizer, count_parameters, load_model

PAUSE = 3.0


def _rows(run_dir):
    return [r for r in read_metrics(run_dir) if "tokens_per_s" in r]


def test_throughput_leaves_out_evaluation_and_checkpoint_time(train_run, monkeypatch):
    """A window that follows an evaluation and a checkpoint (here each made PAUSE seconds slower)
    reports the speed of its training steps alone; it used to count the time since the last row,
    evaluation and checkpoint included (about 35x under-reported after an eval)."""
    evaluate, save = train._evaluate, train.checkpoint.save

    def slow_evaluate(*args, **kwargs):
        time.sleep(PAUSE)
        return evaluate(*args, **kwargs)

    def slow_save(*args, **kwargs):
        time.sleep(PAUSE)
        return save(*args, **kwargs)

    monkeypatch.setattr(train, "_evaluate", slow_evaluate)
    monkeypatch.setattr(train.checkpoint, "save", slow_save)
    args = ["train.max_steps=4", "logger.log_every=2", "train.eval_every=2", "train.save_every=2"]
    _, run_dir = train_run(args)
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    # 2 steps of 8 pairs: counting the 2 x PAUSE s before it, the second row could not exceed
    # 16 / 6 = 2.7 pairs/s; the tiny model trains far faster than 16 pairs in 2 s.
    assert rows[1]["pairs_per_s"] > 16 / 2.0, rows[1]


def test_padding_share_is_the_padded_share_of_computed_positions(train_run):
    """The default run (prompt-shared rows, micro batches sorted by length): padding_share is
    1 - computed tokens / computed positions of its batches, rebuilt here the same way; and
    tokens_per_s counts each sequence's own tokens (its prompt once per response), more than
    were computed."""
    _, run_dir = train_run(["train.max_steps=1", "logger.log_every=1", "train.eval_every=null"])
    cfg = make_config(["train.batch_size=8", "train.micro_batch_size=4", "data.synthetic.num_train=256"])
    tokenizer = byte_tokenizer()
    data = prepare(cfg.data, tokenizer, cfg.train.seed).train
    indices = step_indices(0, len(data), 8, cfg.train.seed)
    lengths = [example_length(ex) for ex in data]
    real = total = sequence_tokens = 0
    for idx in micro_batches(indices, 0, 1, 4, lengths):
        batch = make_batch(data, idx, tokenizer.pad_token_id, instantiate(cfg.loss), "cpu", "shared")
        real, total = real + int(batch["attention_mask"].sum()), total + batch["attention_mask"].numel()
        sequence_tokens += int(batch["length"].sum())
    assert total > real  # the synthetic pairs differ in length: some padding
    row = _rows(run_dir)[0]
    assert row["padding_share"] == pytest.approx(1 - real / total)
    assert sequence_tokens > real  # each prompt computed once, counted twice
    assert row["tokens_per_s"] / row["pairs_per_s"] == pytest.approx(sequence_tokens / 8)


@pytest.mark.parametrize("loss, factor", [("dpo", 8), ("simpo", 6)])
def test_mfu_counts_8n_with_a_live_reference_and_6n_without(train_run, loss, factor):
    """MFU is over the tokens computed: with padded rows those are the sequences' own tokens
    (tokens_per_s); with prompts shared, fewer."""
    peak = 0.25  # TFLOP/s, as set by logger.peak_tflops
    args = [f"loss={loss}", "train.max_steps=2", "logger.log_every=1", f"logger.peak_tflops={peak}"]
    _, run_dir = train_run(args + ["train.layout=padded"])
    cfg = make_config([f"loss={loss}"])
    _, n = count_parameters(load_model(cfg.model, byte_tokenizer(), cfg.train.seed))
    for row in _rows(run_dir):
        assert row["mfu"] == pytest.approx(factor * n * row["tokens_per_s"] / (peak * 1e12), rel=1e-9)
    _, shared_dir = train_run(args + ["train.layout=shared"], run_dir.parent / "shared")
    for row in _rows(shared_dir):
        assert row["mfu"] < 0.9 * factor * n * row["tokens_per_s"] / (peak * 1e12)


def test_no_mfu_without_a_peak(train_run):
    _, run_dir = train_run(["train.max_steps=1", "train.eval_every=null"])
    assert all("mfu" not in r for r in _rows(run_dir))


def _kto_batches(cfg, indices_per_step):
    tokenizer = byte_tokenizer()
    data = prepare(cfg.data, tokenizer, cfg.train.seed).train
    loss_fn = instantiate(cfg.loss)
    lengths = [example_length(ex) for ex in data]
    for step in indices_per_step:
        indices = step_indices(step, len(data), cfg.train.batch_size, cfg.train.seed)
        for idx in micro_batches(indices, 0, 1, cfg.train.micro_batch_size, lengths):
            yield make_batch(data, idx, tokenizer.pad_token_id, loss_fn, "cpu", "padded")


def test_kto_counts_its_kl_rows_at_their_cost_and_its_examples_as_examples(train_run):
    """KTO's KL rows run forward only (no gradient): 2N for the policy + 2N for the live
    reference per token, not 8N, and they are not trained tokens (tokens_per_s); unpaired data
    logs examples_per_s, not pairs_per_s. Both used to be overstated."""
    peak = 0.25
    data = [f"data.path={REPO / 'tests/fixtures/kto_sample.jsonl'}", "data.eval_holdout=4"]
    args = ["data=kto", "loss=kto", "train.max_steps=1", "logger.log_every=1", "train.eval_every=null"]
    args += [*data, f"logger.peak_tflops={peak}", "train.layout=padded", "judge=none", "model.warm_start.steps=0"]
    args += ["train.batch_size=8", "train.micro_batch_size=4"]
    _, run_dir = train_run(args, fast=False)
    row = _rows(run_dir)[0]
    assert "pairs_per_s" not in row and row["examples_per_s"] > 0
    cfg = make_config(args)
    _, n = count_parameters(load_model(cfg.model, byte_tokenizer(), cfg.train.seed))
    trained = forward = sequence_tokens = 0
    for batch in _kto_batches(cfg, [0]):
        per_row = batch["attention_mask"].sum(-1)
        trained += int(per_row[~batch["row_kl"]].sum())
        forward += int(per_row[batch["row_kl"]].sum())
        sequence_tokens += int(batch["length"][batch["role"] != 2].sum())
    assert forward > 0
    seconds = 8 / row["examples_per_s"]
    assert row["tokens_per_s"] * seconds == pytest.approx(sequence_tokens)
    assert row["mfu"] == pytest.approx((8 * n * trained + 4 * n * forward) / seconds / (peak * 1e12), rel=1e-9)
