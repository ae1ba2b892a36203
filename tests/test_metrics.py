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
