"""model.warm_start: its saved weights are reused only when they were made the same way, and it
shows progress and stops on a signal like the rest of the run."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import BIN, QUIET, make_config
from omegaconf import OmegaConf

from dpo_cli.data.prepare import prepare
from dpo_cli.errors import EXIT_INTERRUPTED
from dpo_cli.modeling import byte_tokenizer, load_model
from dpo_cli.overrides import resume_subdir
from dpo_cli.warmstart import warm_start, warm_started


def _setup(extra: list[str] = ()):
    cfg = make_config(["data.format.num_train=64", "data.format.num_eval=8", *extra])
    tokenizer = byte_tokenizer()
    return cfg, tokenizer, prepare(cfg.data, tokenizer, 0).train


def _ws(steps: int):
    return OmegaConf.create({"steps": steps, "lr": 1e-3, "batch_size": 4, "responses": "both"})


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.integration
def test_a_saved_warm_start_made_with_other_settings_is_redone_not_loaded(tmp_path, caplog):
    """A run directory reused after a failed start (8 warm-start steps), now asked for 16: it
    used to load the 8-step weights with an INFO line."""
    caplog.set_level(logging.INFO)
    cfg, tokenizer, data = _setup()
    saved = tmp_path / "warm_start"
    warm_started(load_model(cfg.model, tokenizer, 0), data, _ws(2), 0, tokenizer.pad_token_id, saved)
    model = load_model(cfg.model, tokenizer, 0)
    warm_started(model, data, _ws(4), 0, tokenizer.pad_token_id, saved)
    fresh = load_model(cfg.model, tokenizer, 0)
    warm_start(fresh, data, _ws(4), 0, tokenizer.pad_token_id)
    assert torch.equal(_weights(model), _weights(fresh))
    assert "steps differ" in caplog.text
    again = load_model(cfg.model, tokenizer, 0)  # the same settings now: loaded, not redone
    warm_started(again, data, _ws(4), 0, tokenizer.pad_token_id, saved)
    assert torch.equal(_weights(again), _weights(fresh))
    assert "the weights of this run's warm start" in caplog.text


@pytest.mark.parametrize("change", ["seed", "data", "architecture"])
def test_a_saved_warm_start_of_another_seed_data_or_model_is_redone(tmp_path, caplog, change):
    """Another seed or data gives other weights; another architecture used to be a size-mismatch
    traceback."""
    cfg, tokenizer, data = _setup()
    saved = tmp_path / "warm_start"
    warm_started(load_model(cfg.model, tokenizer, 0), data, _ws(2), 0, tokenizer.pad_token_id, saved)
    seed = 1 if change == "seed" else 0
    if change == "data":
        data = data[:32]
    if change == "architecture":
        cfg, _, _ = _setup(["model.random_init.hidden_size=32", "model.random_init.intermediate_size=64"])
    model = load_model(cfg.model, tokenizer, seed)
    warm_started(model, data, _ws(2), seed, tokenizer.pad_token_id, saved)
    assert f"{change} differ" in caplog.text


def _start(run_dir, extra):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    args = [*QUIET, "logger.progress=true", "train.max_steps=2", "judge=none", f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(
        [str(BIN / "dpo-train"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.integration
def test_the_warm_start_shows_progress_and_stops_on_the_first_signal(tmp_path):
    """It used to print nothing for minutes and act on SIGTERM only after the warm start and one
    training step; now it says what it does, shows a bar, and stops within a step."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, ["model.warm_start.steps=100000"])
    try:
        seen = ""
        deadline = time.time() + 120
        while "warm start: 100000 steps" not in seen and time.time() < deadline:
            seen += proc.stdout.readline()
        assert "warm start: 100000 steps" in seen, seen
        time.sleep(2.0)
        signalled = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a run that ignored the signal must not outlive the test
    assert time.time() - signalled < 30
    assert proc.returncode == EXIT_INTERRUPTED, seen + out
    assert "stopped during the warm start" in out and "Traceback" not in out
    assert "warm start:" in out and "step/s" in out or "s/step" in out  # the bar was drawn
    assert not (run_dir / "warm_start" / "model.safetensors").exists()


@pytest.mark.integration
def test_a_failed_start_s_recorded_config_gives_way_to_the_next_start(tmp_path):
    """A start that failed after its warm start (warm_start/ written, no step trained) left its
    .hydra/config.yaml, and the next start into the directory recorded its own config under
    .hydra/resume-1 only, so mode=eval rebuilt the reference from the failed attempt's settings.
    A directory that trained, or that a run holds now, keeps its config."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "warm_start").mkdir()
    (run_dir / ".lock").write_text("")
    assert resume_subdir(run_dir) is None  # Hydra writes .hydra/ itself: this start's config
    fd = os.open(run_dir / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds it
    try:
        assert resume_subdir(run_dir) == ".hydra/resume-1"
    finally:
        os.close(fd)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    assert resume_subdir(run_dir) == ".hydra/resume-1"
