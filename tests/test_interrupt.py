"""Interruptions as they happen to real runs: signals, kill -9, non-finite steps. Each ends
with a checkpoint from which `train.resume=auto` continues exactly, or with a clear message."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, FAST, QUIET, read_metrics
from safetensors.torch import load_file

from dpo_cli import step
from dpo_cli.errors import EXIT_INTERRUPTED, EXIT_NONFINITE, NonFiniteError

ARGS = [*QUIET, *FAST, "train.max_steps=24", "train.save_every=4", "train.eval_every=8", "train.keep_checkpoints=null"]


def _start(run_dir: Path, extra: list[str] = ()) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [str(BIN / "dpo-train"), *ARGS, *extra, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for_rows(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and sum(1 for _ in path.open()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    raise AssertionError(f"no {n} rows in {path} after {timeout} s")


def _run(run_dir: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    proc = _start(run_dir, extra)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run_dir.parent.mkdir(exist_ok=True)
    proc = _run(run_dir)
    assert proc.returncode == 0, proc.stdout
    return run_dir


def _assert_same_run(a: Path, b: Path) -> None:
    """Same metric rows (throughput aside) and bitwise the same final weights."""
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for x, y in zip(rows_a, rows_b, strict=True):
        for key in x.keys() - {"tokens_per_s", "pairs_per_s"}:
            assert x[key] == y[key], (key, x, y)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.integration
def test_each_signal_saves_a_checkpoint_and_the_resume_matches(tmp_path, uninterrupted):
    """SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 in turn, each to the run as resumed after the one
    before (once 5, 10, 15 and 20 rows are logged): each stops it after a step, with a
    checkpoint and one message; the last resume ends as the uninterrupted run, which it does
    only if every resume before it continued exactly."""
    run_dir = tmp_path / "run"
    for n, sig in enumerate([signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2], start=1):
        proc = _start(run_dir, ["train.resume=auto"] if n > 1 else [])
        _wait_for_rows(run_dir, 5 * n, proc)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_INTERRUPTED, (sig.name, out)
        assert "Traceback" not in out and f"{sig.name}: stopped after step" in out, (sig.name, out)
        assert "train.resume=auto" in out
        step = int(out.split("stopped after step ")[1].split()[0])
        assert (run_dir / "checkpoints" / f"step-{step}").is_dir()
    resumed = _run(run_dir, ["train.resume=auto"])
    assert resumed.returncode == 0, resumed.stdout
    _assert_same_run(uninterrupted, run_dir)


@pytest.mark.integration
def test_a_second_ctrl_c_exits_at_once():
    """The handler the loop installs, in a process of its own: the first SIGINT asks for a
    stop, the second one (once the first was seen) ends the process at once, exit 130."""
    code = (
        "import os, signal, time\n"
        "from dpo_cli.signals import StopOnSignal\n"
        "with StopOnSignal() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    while stop.received is None: time.sleep(0.01)\n"
        "    print('first seen', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
    )
    proc = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "first seen" in proc.stdout and "second SIGINT" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_kill_9_at_several_moments_then_resume_matches(tmp_path, uninterrupted):
    """kill -9 while computing, evaluating, writing metrics or saving a checkpoint (wherever the
    random moment falls), three times, resuming each time: the run ends as if uninterrupted."""
    import random

    rng = random.Random(0)
    run_dir = tmp_path / "run"
    for n_rows in (3, 9, 15):
        proc = _start(run_dir, ["train.resume=auto"] if (run_dir / "metrics.jsonl").exists() else [])
        _wait_for_rows(run_dir, n_rows, proc)
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.wait()
    done = _run(run_dir, ["train.resume=auto"])
    assert done.returncode == 0, done.stdout
    _assert_same_run(uninterrupted, run_dir)


def _nan_on(calls: set[int], monkeypatch) -> None:
    """Make the training loss of the given batch_loss calls (0-based) NaN: a fault injected
    into the real loss, as an fp16 overflow or a bad row would produce."""
    real = step.batch_loss
    seen = {"n": 0}

    def faulty(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        n = seen["n"]
        seen["n"] += 1
        return (loss * float("nan"), parts) if n in calls else (loss, parts)

    monkeypatch.setattr(step, "batch_loss", faulty)


@pytest.mark.integration
def test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights(train_run, monkeypatch, tmp_path, caplog):
    """A NaN loss at step 2 (its two micro batches): the update is skipped, `nonfinite_steps`
    counts it, the step's pair indices are logged; the run then trains on and finishes."""
    _nan_on({2, 3}, monkeypatch)
    caplog.set_level("WARNING", logger="dpo_cli.step")
    _, run_dir = train_run(["train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=null"])
    rows = [r for r in read_metrics(run_dir) if "grad_norm" in r]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 1]
    assert "loss" not in rows[1], "the skipped step's metrics must not enter the averages"
    assert all(math.isfinite(r["loss"]) for r in (rows[0], rows[2], rows[3]))
    assert "step 2: non-finite loss" in caplog.text and "the step's pairs: [" in caplog.text
    one = load_file(run_dir / "checkpoints" / "step-1" / "model.safetensors")
    two = load_file(run_dir / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one), "the skipped step changed the weights"


@pytest.mark.integration
def test_consecutive_non_finite_steps_stop_the_run_with_its_last_good_state(train_run, monkeypatch, tmp_path):
    _nan_on(set(range(2, 100)), monkeypatch)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row") as e:
        train_run(["train.max_steps=10", "train.max_nonfinite_steps=3", "train.save_every=null"])
    assert e.value.exit_code == EXIT_NONFINITE
    run_dir = tmp_path / "run"
    assert not (run_dir / "final").exists()
    assert "learning rate" in str(e.value) and "fp16" in str(e.value)
    saved = load_file(run_dir / "checkpoints" / "step-4" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.integration
def test_a_diverging_learning_rate_ends_with_exit_3_and_no_final_model(tmp_path):
    proc = _run(tmp_path / "run", ["optimizer.lr=1e30", "train.max_nonfinite_steps=2"])
    assert proc.returncode == EXIT_NONFINITE, proc.stdout
    assert "Traceback" not in proc.stdout and "non-finite" in proc.stdout
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.integration
def test_a_learning_rate_whose_step_overflows_is_one_clear_error(tmp_path):
    """lr 1e38 with a warmup that starts at lr / 2: AdamW's step size lr / (1 - beta1) = 5e38
    does not fit float32, and torch raised RuntimeError (a traceback, exit 1) on step 1."""
    proc = _run(tmp_path / "run", ["optimizer.lr=1e38"])
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stdout and "lower optimizer.lr" in proc.stdout


@pytest.mark.integration
def test_a_window_of_skipped_steps_ends_through_the_guard_with_the_progress_bar_on(tmp_path):
    """lr 1e6 diverges: the guard skips steps as designed, and a logging window whose steps were
    all skipped has no loss. The progress bar used to raise KeyError: 'loss' (exit 1, a
    traceback); now the row logs what it has and the run ends through the guard's message."""
    extra = ["optimizer.lr=1e6", "logger.progress=true", "logger.log_every=1", "train.max_nonfinite_steps=3"]
    proc = _run(tmp_path / "run", extra)
    assert proc.returncode == EXIT_NONFINITE, proc.stdout
    assert "Traceback" not in proc.stdout and "KeyError" not in proc.stdout
    assert "3 optimizer steps in a row had a non-finite loss" in proc.stdout
    training_rows = [r for r in read_metrics(tmp_path / "run") if "epoch" in r]  # not the eval rows
    skipped = [r for r in training_rows if "loss" not in r]
    assert skipped and all(r["nonfinite_steps"] >= 1 and r["lr"] > 0 for r in skipped)


@pytest.mark.integration
def test_a_generation_row_alone_does_not_stop_the_progress_bar(train_run):
    """Generation due at a step where the held-out evaluation is not (eval.generate_every=2,
    train.eval_every=1000): its row has no eval_loss, which the progress bar used to read as a
    training row (KeyError: 'loss')."""
    args = ["logger.progress=true", "judge=sort", "eval.generate_every=2", "eval.prompts=4", "train.eval_every=1000"]
    _, run_dir = train_run([*args, "train.max_steps=3"])
    rows = read_metrics(run_dir)
    alone = [r for r in rows if r["step"] == 2 and "eval_win_rate" in r]
    assert alone and "eval_loss" not in alone[0]


@pytest.mark.integration
def test_constant_schedule_honours_its_warmup(train_run):
    _, run_dir = train_run(["scheduler.name=constant", "scheduler.warmup_steps=2", "train.max_steps=4"])
    lrs = [r["lr"] for r in read_metrics(run_dir) if "lr" in r]
    assert lrs == [5e-4, 1e-3, 1e-3, 1e-3]  # warmup from lr / 2 on the first step


@pytest.mark.integration
def test_a_run_that_saved_no_checkpoint_is_started_over_by_resume_auto(train_run, tmp_path):
    args = ["train.max_steps=2", "train.save_every=null"]
    _, run_dir = train_run(args)
    (run_dir / "final").rename(run_dir / "final-old")
    with pytest.raises(Exception, match="it saved no checkpoint; train.resume=auto starts it over"):
        train_run(args, run_dir)
    train_run([*args, "train.resume=auto"], run_dir)
    assert (run_dir / "metrics.abandoned-1.jsonl").exists()
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]


@pytest.mark.integration
def test_signal_handlers_are_restored_after_a_run(train_run):
    before = signal.getsignal(signal.SIGTERM)
    train_run(["train.max_steps=1"])
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_arriving_while_the_first_is_logged_is_taken_quietly():
    """SLURM's `scancel --full` delivers USR1 two or three times within milliseconds. A second
    one that comes while the handler is still writing its warning used to log it again, from
    inside the first write (a reentrant write to train.log: "--- Logging error ---" and a
    traceback in slurm-<id>.out). One warning, one request."""
    from dpo_cli.signals import StopOnSignal

    stop = StopOnSignal()
    seen: list[str] = []

    class SecondSignalDuringWrite(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())
            if len(seen) == 1:
                stop._handle(signal.SIGUSR1, None)  # as Python runs a handler between bytecodes

    handler = SecondSignalDuringWrite()
    logging.getLogger("dpo_cli.signals").addHandler(handler)
    try:
        stop._handle(signal.SIGUSR1, None)
    finally:
        logging.getLogger("dpo_cli.signals").removeHandler(handler)
    assert len(seen) == 1 and seen[0].startswith("SIGUSR1 received") and stop.received == signal.SIGUSR1


# A launch of the real CLI on two gloo processes; with FAULT set, rank 1's training loss is NaN
# on its calls listed there (rank 0 computes normally), as one process's bad shard would be.
LAUNCHED = """
import os, sys
if os.environ.get("FAULT") and os.environ.get("RANK") == "1":
    from dpo_cli import step
    real, calls, seen = step.batch_loss, {int(c) for c in os.environ["FAULT"].split(",")}, [0]
    def faulty(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        seen[0] += 1
        return (loss * float("nan"), parts) if seen[0] - 1 in calls else (loss, parts)
    step.batch_loss = faulty
from dpo_cli.cli import main
sys.argv = ["dpo-train", *sys.argv[1:]]
main()
"""


def _launch(tmp_path: Path, run_dir: Path, extra: list[str], env: dict | None = None) -> subprocess.Popen:
    from conftest import free_port

    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)]
    cmd += [*ARGS, *extra, f"hydra.run.dir={run_dir}"]
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _resume_on_two_and_compare(tmp_path: Path, run_dir: Path, uninterrupted: Path) -> None:
    """Resume `run_dir` on two processes; its rows must match the single-process run's within
    float rounding (two processes sum gradients in another order)."""
    proc = _launch(tmp_path, run_dir, ["train.resume=auto"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    rows, base = read_metrics(run_dir), read_metrics(uninterrupted)
    assert [r["step"] for r in rows] == [r["step"] for r in base]
    for a, b in zip(base, rows, strict=True):
        for key in ("loss", "eval_loss", "grad_norm", "rewards/margins"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (key, a, b)


@pytest.mark.integration
@pytest.mark.distributed
def test_two_processes_agree_on_a_signal_one_of_them_received(tmp_path, uninterrupted):
    """SIGTERM to rank 1 alone: both processes stop after the same step, the checkpoint is
    written by both, and a 2-process resume ends like the uninterrupted run."""
    import psutil

    run_dir = tmp_path / "run"
    proc = _launch(tmp_path, run_dir, [])
    _wait_for_rows(run_dir, 6, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "launched.py" in " ".join(p.cmdline())]
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert "SIGTERM: stopped after step" in out, out
    assert "terminate called" not in out and "Traceback" not in out.split("SIGTERM: stopped")[0], out
    step = int(out.split("stopped after step ")[1].split()[0])
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    _resume_on_two_and_compare(tmp_path, run_dir, uninterrupted)


@pytest.mark.integration
@pytest.mark.distributed
def test_two_processes_agree_to_skip_a_step_only_one_of_them_saw_as_non_finite(tmp_path):
    """Rank 1's loss is NaN on step 2 only: neither process applies that update (the weights
    after step 2 equal those after step 1, on both), and the run goes on."""
    run_dir = tmp_path / "run"
    proc = _launch(
        tmp_path, run_dir, ["train.max_steps=4", "train.save_every=1"], env={"FAULT": "1"}
    )  # one micro batch per process per step
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    rows = [r for r in read_metrics(run_dir) if "grad_norm" in r]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 1]
    one = load_file(run_dir / "checkpoints" / "step-1" / "model.safetensors")
    two = load_file(run_dir / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.integration
@pytest.mark.distributed
def test_a_one_process_checkpoint_resumes_on_two_processes(tmp_path, uninterrupted):
    """The global batch is the same on 1 and 2 processes, so a checkpoint written by one process
    continues on two with the same batches; the rows match within float rounding."""
    import shutil

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints" / "step-8", run_dir / "checkpoints" / "step-8")
    shutil.copy(uninterrupted / "metrics.jsonl", run_dir / "metrics.jsonl")
    _resume_on_two_and_compare(tmp_path, run_dir, uninterrupted)
