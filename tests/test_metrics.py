"""Metric sinks: what they write and that they leave the console as they found it."""

from __future__ import annotations

import json
import logging

import pytest

from dpo_cli.metrics import JsonlSink, MetricLogger, ProgressSink


def test_progress_bar_restores_console_logging_even_on_errors():
    root = logging.getLogger()
    console = logging.StreamHandler()
    root.addHandler(console)
    try:
        before = list(root.handlers)
        with pytest.raises(RuntimeError), MetricLogger([ProgressSink(total=3, initial=0)]):
            assert console not in root.handlers  # replaced by a tqdm-aware handler while the bar runs
            raise RuntimeError("training failed")
        assert root.handlers == before
    finally:
        root.removeHandler(console)


def test_jsonl_resume_drops_later_rows_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    sink = JsonlSink(path, resume_step=1)
    sink.log({"step": 2, "loss": 0.5})
    sink.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 0.7},
        {"step": 2, "loss": 0.5},
    ]


def test_progress_bar_shows_what_the_row_has():
    """Unpaired data (KTO) logs no rewards/accuracies: the bar shows the loss without it."""
    sink = ProgressSink(total=3, initial=0)
    try:
        sink.log({"step": 1, "loss": 0.5, "kl": 0.1})
        assert "loss=0.5000" in str(sink.bar) and "acc" not in str(sink.bar)
        sink.log({"step": 2, "loss": 0.4, "rewards/accuracies": 0.75})
        assert "acc=0.750" in str(sink.bar)
    finally:
        sink.close()


def test_progress_bar_takes_rows_without_a_loss():
    """A generation evaluation logs its row alone (eval_win_rate, no eval_loss), and a window
    whose steps were all skipped as non-finite has no loss: both used to raise KeyError: 'loss'
    and end the run with a traceback."""
    sink = ProgressSink(total=40, initial=0)
    try:
        sink.log({"step": 32, "eval_win_rate": 0.7, "eval_tie_rate": 0.1})
        assert sink.bar.n == 32
        sink.log({"step": 33, "lr": 1e6, "nonfinite_steps": 1, "grad_norm": float("nan")})
        assert sink.bar.n == 33 and "skipped=1" in str(sink.bar) and "loss" not in str(sink.bar)
        sink.log({"step": 34, "loss": 0.5, "nonfinite_steps": 1})
        assert "loss=0.5000" in str(sink.bar)
    finally:
        sink.close()
