"""Throughput metrics: the arithmetic of dpo_cli/throughput.py on hand-built counts and on real
batches (each sequence's own tokens, the positions computed, the padding share, pairs or
examples per second, MFU under the stated FLOP formula); then one real run whose logged rows
agree with its batches and count training time only (not evaluation or checkpoints)."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import FAST, QUIET, REPO, make_config, read_metrics
from hydra.utils import instantiate

from dpo_cli import checkpoint, train
from dpo_cli.data.batching import micro_batches, step_indices
from dpo_cli.data.prepare import prepare
from dpo_cli.data.tokenize import example_length
from dpo_cli.logprobs import KL
from dpo_cli.modeling import byte_tokenizer, count_parameters, load_model
from dpo_cli.reference import AdapterReference, ModelReference, PrecomputedReference
from dpo_cli.scoring import make_batch
from dpo_cli.throughput import Window, flops_per_token

PAUSE = 1.0
PEAK = 0.25  # TFLOP/s, as logger.peak_tflops sets it
N = 1000  # the policy's parameters, for hand-worked FLOPs


class Processes:
    """The accelerator as Window.throughput sees it: `n` processes that counted alike, so the
    sum over them is n times the local counts."""

    def __init__(self, n: int = 1):
        self.num_processes = n

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        assert op == "sum"
        return x * self.num_processes


def _rows(run_dir):
    return [r for r in read_metrics(run_dir) if "tokens_per_s" in r]


def _counts(window: Window) -> dict[str, float]:
    return dict(zip(Window.COUNTERS, window.counts.tolist(), strict=True))


def test_flops_per_token_adds_a_reference_forward_only_for_a_model_run_each_step():
    """6N per trained token (forward + backward), 2N per forward-only token (KTO's KL rows);
    a reference model run each step adds 2N to both; precomputed log-probs or none add nothing."""
    model = torch.nn.Linear(2, 2)
    assert flops_per_token(N, None) == (6 * N, 2 * N)
    assert flops_per_token(N, ModelReference(model, "a frozen copy")) == (8 * N, 4 * N)
    assert flops_per_token(N, AdapterReference(model)) == (8 * N, 4 * N)
    assert flops_per_token(N, PrecomputedReference({}, "a table")) == (6 * N, 2 * N)


def _hand_batch() -> dict[str, torch.Tensor]:
    """Three rows of 6 positions: a prompt-shared row (prompt 2 + chosen 2 + rejected 1 tokens:
    5 computed, sequences of 4 and 3 tokens), a padded row (one sequence of 3) and a KL row of 4
    tokens (forward only, not trained on)."""
    return {
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]),
        "row_kl": torch.tensor([False, False, True]),
        "role": torch.tensor([0, 1, 0, KL]),
        "length": torch.tensor([4, 3, 3, 4]),
    }


def test_window_counts_own_tokens_computed_positions_and_forward_rows():
    """tokens = 4 + 3 + 3 (the shared prompt counted once per response, the KL row left out),
    computed = 5 + 3, positions = 3 x 6 (padding included), forward = 4; per micro batch added."""
    window = Window("cpu")
    window.add_tokens(_hand_batch())
    assert _counts(window) == {"tokens": 10, "computed": 8, "positions": 18, "forward": 4}
    window.add_tokens(_hand_batch())
    assert _counts(window) == {"tokens": 20, "computed": 16, "positions": 36, "forward": 8}


def test_window_state_round_trips_and_reads_older_checkpoints():
    window = Window("cpu")
    window.add_tokens(_hand_batch())
    window.steps, window.seconds = 3, 1.5
    window.metrics.add({"loss": (torch.tensor(1.5), torch.tensor(3))})
    copy = Window("cpu")
    copy.restore(window.state())
    assert copy.state() == window.state() and copy.steps == 3 and copy.seconds == 1.5
    # Checkpoints written before "computed", "positions", "forward" and "seconds" existed.
    copy.restore({"parts": {}, "tokens": 7.0, "steps": 2})
    assert _counts(copy) == {"tokens": 7, "computed": 7, "positions": 0, "forward": 0}
    assert (copy.steps, copy.seconds) == (2, 0.0)
    copy.clear()
    assert _counts(copy) == dict.fromkeys(Window.COUNTERS, 0) and (copy.steps, copy.seconds) == (0, 0.0)


def test_throughput_is_per_second_of_training_time_over_every_process():
    """2 steps of 8 pairs in 4 s with the hand batch twice: tokens 20 / 4 s; pairs 16 / 4 s;
    padding 1 - (16 computed + 8 forward) / 36 positions = 1/3; MFU (8N x 16 + 4N x 8) / 4 s
    over the peak. On 2 processes the tokens double, the global batch does not, and the peak
    is per process."""
    window = Window("cpu")
    window.add_tokens(_hand_batch())
    window.add_tokens(_hand_batch())
    window.steps, window.seconds = 2, 4.0
    flops = flops_per_token(N, ModelReference(torch.nn.Linear(2, 2), "copy"))
    row = window.throughput(Processes(), 8, "pairs", flops, PEAK)
    assert row == pytest.approx(
        {"tokens_per_s": 5.0, "pairs_per_s": 4.0, "padding_share": 1 / 3, "mfu": (8 * N * 16 + 4 * N * 8) / 4 / 0.25e12}
    )
    two = window.throughput(Processes(2), 8, "pairs", flops, PEAK)
    assert two == pytest.approx({**row, "tokens_per_s": 10.0})
    unpaired = window.throughput(Processes(), 8, "examples", flops, None)  # no peak: no mfu
    assert unpaired == pytest.approx({"tokens_per_s": 5.0, "examples_per_s": 4.0, "padding_share": 1 / 3})
    empty = Window("cpu").throughput(Processes(), 8, "pairs", flops, PEAK)  # nothing counted yet
    assert empty["padding_share"] == 0.0 and empty["tokens_per_s"] == 0.0 and empty["mfu"] == 0.0


def _step_batches(cfg, steps: list[int], layout: str):
    """The micro batches of these optimizer steps as one process of the run of `cfg` makes them
    (sorted by length), with the data's unit ("pairs" or "examples")."""
    tokenizer = byte_tokenizer()
    data = prepare(cfg.data, tokenizer, cfg.train.seed)
    loss_fn = instantiate(cfg.loss)
    lengths = [example_length(ex) for ex in data.train]
    batches = []
    for step in steps:
        indices = step_indices(step, len(data.train), cfg.train.batch_size, cfg.train.seed)
        for idx in micro_batches(indices, 0, 1, cfg.train.micro_batch_size, lengths):
            batches.append(make_batch(data.train, idx, tokenizer.pad_token_id, loss_fn, "cpu", layout))
    return batches, data.unit


def test_real_batches_count_each_sequence_once_in_every_layout():
    """The same step in padded and prompt-shared rows: the same tokens (each sequence's own,
    its prompt once per response, as any padded trainer computes them); padded rows compute
    exactly those, shared rows fewer (each prompt once); the synthetic pairs differ in length,
    so padded rows hold padding."""
    cfg = make_config([*QUIET, *FAST])
    counts = {}
    for layout in ("padded", "shared"):
        window = Window("cpu")
        batches, unit = _step_batches(cfg, [0], layout)
        for batch in batches:
            window.add_tokens(batch)
        counts[layout] = _counts(window)
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        assert counts[layout]["computed"] == real and counts[layout]["forward"] == 0
        assert counts[layout]["positions"] == sum(b["attention_mask"].numel() for b in batches)
        assert counts[layout]["tokens"] == sum(int(b["length"].sum()) for b in batches)
    assert unit == "pairs"
    padded, shared = counts["padded"], counts["shared"]
    assert padded["tokens"] == shared["tokens"] == padded["computed"]
    assert shared["computed"] < 0.9 * shared["tokens"]
    assert padded["positions"] > padded["computed"]


def test_kto_counts_its_kl_rows_at_their_cost_and_its_examples_as_examples():
    """KTO's KL rows run forward only (no gradient): 2N for the policy + 2N for the live
    reference per token, not 8N, and they are not trained tokens (tokens_per_s); unpaired data
    counts examples_per_s, not pairs_per_s. Both used to be overstated."""
    data = [f"data.path={REPO / 'tests/fixtures/kto_sample.jsonl'}", "data.eval_holdout=4"]
    cfg = make_config([*QUIET, *FAST, "data=kto", "loss=kto", *data, "train.layout=padded"])
    batches, unit = _step_batches(cfg, [0], "padded")
    assert unit == "examples"
    window = Window("cpu")
    trained = forward = sequence_tokens = 0
    for batch in batches:
        window.add_tokens(batch)
        per_row = batch["attention_mask"].sum(-1)
        trained += int(per_row[~batch["row_kl"]].sum())
        forward += int(per_row[batch["row_kl"]].sum())
        sequence_tokens += int(batch["length"][batch["role"] != KL].sum())
    assert forward > 0 and trained == sequence_tokens  # padded: one sequence per row
    window.steps, window.seconds = 1, 2.0
    flops = flops_per_token(N, ModelReference(torch.nn.Linear(2, 2), "copy"))
    row = window.throughput(Processes(), cfg.train.batch_size, unit, flops, PEAK)
    assert "pairs_per_s" not in row and row["examples_per_s"] == cfg.train.batch_size / 2.0
    assert row["tokens_per_s"] * 2.0 == pytest.approx(sequence_tokens)
    assert row["mfu"] == pytest.approx((8 * N * trained + 4 * N * forward) / 2.0 / (PEAK * 1e12), rel=1e-9)


@pytest.mark.integration
def test_logged_throughput_leaves_out_evaluation_and_checkpoint_time(train_run, monkeypatch):
    """The real loop (padded rows, DPO with a live reference, a peak set): a window that follows
    an evaluation and a checkpoint (here each made PAUSE seconds slower) reports the speed of
    its training steps alone (it used to count the time since the last row, evaluation and
    checkpoint included: about 35x under-reported after an eval); each row's counts are those
    of its steps' batches, rebuilt here, and its MFU is 8N per token."""
    evaluate, save = train._evaluate, checkpoint.save

    def slow_evaluate(*args, **kwargs):
        time.sleep(PAUSE)
        return evaluate(*args, **kwargs)

    def slow_save(*args, **kwargs):
        time.sleep(PAUSE)
        return save(*args, **kwargs)

    real_step, spent = train.train_step, []

    def timed_step(*args, **kwargs):
        started = time.perf_counter()
        out = real_step(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return out

    monkeypatch.setattr(train, "_evaluate", slow_evaluate)
    monkeypatch.setattr(checkpoint, "save", slow_save)
    monkeypatch.setattr(train, "train_step", timed_step)
    args = ["train.max_steps=4", "logger.log_every=2", "train.eval_every=2", "train.save_every=2"]
    args += [f"logger.peak_tflops={PEAK}", "train.layout=padded"]
    _, run_dir = train_run(args)
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    # The second row's 2 steps of 8 pairs took at most the time of their train_step calls;
    # counting the 2 x PAUSE s before them (evaluation and checkpoint at step 2) would exceed
    # it however fast or slow the machine is.
    assert len(spent) == 4 and 16 / rows[1]["pairs_per_s"] <= spent[2] + spent[3], (rows[1], spent)

    cfg = make_config([*QUIET, *FAST, *args])
    _, n = count_parameters(load_model(cfg.model, byte_tokenizer(), cfg.train.seed))
    for row, steps in zip(rows, ([0, 1], [2, 3]), strict=True):
        batches, _ = _step_batches(cfg, steps, "padded")
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        total = sum(b["attention_mask"].numel() for b in batches)
        assert total > real  # the synthetic pairs differ in length: some padding
        assert row["padding_share"] == pytest.approx(1 - real / total)
        assert row["tokens_per_s"] / row["pairs_per_s"] == pytest.approx(real / 16)
        assert row["mfu"] == pytest.approx(8 * n * row["tokens_per_s"] / (PEAK * 1e12), rel=1e-9)
