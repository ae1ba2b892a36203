"""`dpo-train` checks its command line before Hydra creates anything (unknown keys with the key
meant, every job of a sweep, the run directory), and keeps runs apart: unique default
directories, one run per directory, a resume's Hydra files beside the original's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import datetime
from types import SimpleNamespace

import pytest
from conftest import FAST, QUIET, make_config, run_cli
from hydra import initialize_config_dir
from test_cli import assert_one_clear_error

from dpo_cli import cli, overrides, rundir
from dpo_cli.config import validate
from dpo_cli.errors import ConfigError, UserError

# --- one command line with several mistakes: one message, exit 2, nothing created -----------------


@pytest.fixture(scope="module")
def bad_keys(tmp_path_factory):
    """Unknown keys with and without '+', and a seed numpy refuses, in one `dpo-train`."""
    cwd = tmp_path_factory.mktemp("bad-keys")
    args = ["dpo-train", "train.max_step=2", "+train.save_evry=5", "+data.pth=x", "+lr=0.5", "train.seed=-1"]
    return run_cli([*args, *QUIET], cwd=cwd), cwd


def test_unknown_keys_are_named_with_the_key_meant(bad_keys):
    proc, _ = bad_keys
    assert_one_clear_error(
        proc,
        "invalid config (5 problem(s))",  # every mistake in one message
        # without '+', Hydra's own compose error, translated:
        "train.max_step is not a config key; did you mean train.max_steps?",
        "train.save_evry is not a config key; did you mean train.save_every?",
        "data.pth is not a config key; did you mean data.path?",
        "lr is not a config key; did you mean optimizer.lr?",  # a key of that name elsewhere
        "train.seed=-1 must be in [0, 2**32 - 1]",
    )
    assert proc.returncode == 2
    assert "use +train.max_step" not in proc.stdout + proc.stderr  # Hydra's advice adds the typo


def test_a_config_error_leaves_no_run_directory(bad_keys):
    proc, cwd = bad_keys
    assert proc.returncode == 2
    assert list(cwd.iterdir()) == []  # no outputs/<date>/<time>/ with .hydra/ and train.log


def test_seed_outside_numpy_range_is_a_config_error():
    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match=rf"train.seed={seed} must be in \[0, 2\*\*32 - 1\]"):
            validate(make_config([f"train.seed={seed}"]))
    validate(make_config([f"train.seed={2**32 - 1}"]))


def test_refused_overrides_are_all_reported_in_process():
    cli.register()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        cfg, problems = overrides.compose_job(
            ["model=lama", "train.batch_size=abc", "optimizer.lrr=1", "loss.beta=0.2"]
        )
    assert cfg is not None and cfg.loss.beta == 0.2  # the rest still composes
    assert problems == [
        "optimizer.lrr is not a config key; did you mean optimizer.lr?",
        "model=lama: Could not find 'model/lama'; available: gpt2, llama, mistral, pretrained, pythia, qwen, smollm2, tiny",
        "train.batch_size=abc: Value 'abc' of type 'str' could not be converted to Integer",
    ]


def test_an_override_inside_a_null_section_is_named_not_a_traceback():
    """data=kto has no data.synthetic section: OmegaConf asserts on data.synthetic.num_train
    without naming it; the message names the override."""
    cli.register()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        cfg, problems = overrides.compose_job(["data=kto", "data.synthetic.num_train=5", "loss=kto"])
    assert cfg is not None and cfg.data.format == "kto"
    assert len(problems) == 1 and problems[0].startswith("data.synthetic.num_train=5: data.synthetic.num_train lies")


# --- sweeps: every job checked before the first starts --------------------------------------------


def test_a_sweep_with_an_invalid_job_starts_none(tmp_path):
    proc = run_cli(["dpo-train", "-m", "loss.beta=0,0.1", *QUIET, *FAST], cwd=tmp_path)
    assert_one_clear_error(
        proc, "invalid sweep: 1 of 2 jobs have config problems; no job was started", "job 0 (loss.beta=0): loss.beta=0"
    )
    assert proc.returncode == 2
    assert "job 1" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []  # no multirun/ directory, no job ran


def test_sweep_jobs_follow_hydras_order():
    cli.register()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        jobs = overrides.sweep_jobs(["loss.beta=0.1,0.2", "mode=inspect", "train.seed=range(1,3)"])
    assert jobs == [
        (["loss.beta=0.1", "mode=inspect", "train.seed=1"], "loss.beta=0.1 train.seed=1"),
        (["loss.beta=0.1", "mode=inspect", "train.seed=2"], "loss.beta=0.1 train.seed=2"),
        (["loss.beta=0.2", "mode=inspect", "train.seed=1"], "loss.beta=0.2 train.seed=1"),
        (["loss.beta=0.2", "mode=inspect", "train.seed=2"], "loss.beta=0.2 train.seed=2"),
    ]


# --- the run directory -----------------------------------------------------------------------------


def test_a_run_directory_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    proc = run_cli(["dpo-train", *QUIET, f"hydra.run.dir={tmp_path}/file/run"], cwd=tmp_path)
    assert_one_clear_error(proc, f"cannot write the run directory {tmp_path}/file/run", "is a file", "hydra.run.dir=")
    assert proc.returncode == 2


def test_check_writable_looks_at_the_nearest_existing_directory(tmp_path, monkeypatch):
    overrides.check_writable(tmp_path / "new" / "run")  # a writable directory: passes
    asked = []
    monkeypatch.setattr(os, "access", lambda path, mode: asked.append(str(path)) or False)  # read-only (as non-root)
    with pytest.raises(UserError, match="read-only / permission denied.*hydra.sweep.dir=DIR"):
        overrides.check_writable(tmp_path / "new" / "run", "hydra.sweep.dir")
    assert asked == [str(tmp_path)]


def test_run_stamps_of_the_same_second_differ():
    now = datetime(2025, 1, 2, 3, 4, 5)
    a, b = cli.new_run_stamp(now), cli.new_run_stamp(now)
    assert a != b
    assert a.startswith("2025-01-02/03-04-05-") and b.startswith("2025-01-02/03-04-05-")


def test_a_resume_keeps_the_original_hydra_files(tmp_path):
    run_dir = tmp_path / "run"
    small = ["data.synthetic.num_train=16", "data.synthetic.num_eval=8"]
    args = ["dpo-train", "train.max_steps=1", "train.save_every=1", *QUIET, *FAST, *small, f"hydra.run.dir={run_dir}"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    hydra = run_dir / ".hydra"
    original = {name: (hydra / name).read_text() for name in ("overrides.yaml", "config.yaml")}
    resumed = run_cli([*args, "train.resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert {name: (hydra / name).read_text() for name in original} == original
    assert "train.resume=auto" in (hydra / "resume-1" / "overrides.yaml").read_text()
    assert overrides.resume_subdir(run_dir) == ".hydra/resume-2"  # the next resume's


def test_an_added_override_stays_with_the_others():
    argv = ["dpo-train", "a=1", "b=2", "--cfg", "job"]
    assert overrides.with_override(argv, ["a=1", "b=2"], "c=3") == ["dpo-train", "a=1", "b=2", "c=3", "--cfg", "job"]
    assert overrides.with_override(["dpo-train", "-m"], [], "c=3") == ["dpo-train", "-m", "c=3"]


# --- one run per directory -----------------------------------------------------------------------

HOLD = """
import sys, time
from dpo_cli.rundir import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_elsewhere(run_dir, seconds: float = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], capture_output=True, text=True)


def test_a_held_run_directory_refuses_a_second_run_until_released(tmp_path):
    run_dir = tmp_path / "run"
    with rundir.hold(run_dir):
        second = _hold_elsewhere(run_dir)
        assert second.returncode != 0
        assert (
            f"{run_dir} is in use by another dpo-train run (pid {os.getpid()} on {socket.gethostname()}); "
            "wait for it or choose another hydra.run.dir"
        ) in second.stderr
    after = _hold_elsewhere(run_dir)
    assert after.returncode == 0 and "held" in after.stdout, after.stderr


def test_a_killed_runs_lock_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid} on"):
            with rundir.hold(run_dir):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (run_dir / rundir.LOCK_NAME).exists()  # left behind by the killed run
    with rundir.hold(run_dir):
        pass


def test_only_the_main_process_takes_the_lock(tmp_path):
    other = SimpleNamespace(is_main_process=False, num_processes=1)
    with rundir.hold(tmp_path / "a", other):
        pass
    assert not (tmp_path / "a" / rundir.LOCK_NAME).exists()
