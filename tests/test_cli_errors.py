"""`dpo-train` checks its command line before Hydra creates anything (unknown keys with the key
meant, every job of a sweep, the run directory), and keeps runs apart: unique default
directories, one run per directory, a resume's Hydra files beside the original's."""

from __future__ import annotations

import os
import re
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


@pytest.mark.integration
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


@pytest.mark.integration
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
    """model=pretrained has no model.random_init section: OmegaConf asserts on
    model.random_init.hidden_size without naming it; the message names the override. A key
    another format has (data.format.num_train with data=kto) is an unknown key of data.format."""
    cli.register()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        cfg, problems = overrides.compose_job(
            ["model=pretrained", "model.name_or_path=x/y", "model.random_init.hidden_size=5"]
        )
        assert cfg is not None and cfg.model.random_init is None
        assert len(problems) == 1
        assert problems[0].startswith("model.random_init.hidden_size=5: model.random_init.hidden_size lies")
        cfg, problems = overrides.compose_job(["data=kto", "data.format.num_train=5", "loss=kto"])
    assert cfg is not None and cfg.data.format._target_ == "dpo_cli.data.formats.kto.KTO"
    assert problems == [
        "data.format.num_train is not a config key; `dpo-train --cfg job` prints the keys of data.format"
    ]


# --- sweeps: every job checked before the first starts --------------------------------------------


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_a_resume_keeps_the_original_hydra_files(tmp_path):
    run_dir = tmp_path / "run"
    small = ["data.format.num_train=16", "data.format.num_eval=8"]
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


@pytest.mark.integration
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


@pytest.mark.integration
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


# --- messages that name the real cause ------------------------------------------------------------


def test_a_value_split_at_a_space_or_holding_grammar_gets_the_quoting_hint():
    cli.register()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        _, split = overrides.compose_job(["data=pairs", "data.path=my", "data.jsonl"])
        _, grammar = overrides.compose_job(["data=pairs", "data.path=my (data).jsonl"])
    (problem,) = split
    assert problem.startswith("data.jsonl: ") and "missing EQUAL" in problem, problem
    assert "the shell split a value at a space: quote the whole override, e.g. 'data.path=my data.jsonl'" in problem
    (problem,) = grammar
    assert problem.startswith("data.path=my (data).jsonl: mismatched input"), problem
    assert """quote the value for Hydra inside the shell's quotes, e.g. "data.path='my (data).jsonl'\"""" in problem


def test_a_missing_local_model_says_relative_to_only_for_a_relative_path(tmp_path, monkeypatch):
    from dpo_cli.modeling import local_dir_problem

    monkeypatch.chdir(tmp_path)
    absolute = local_dir_problem(str(tmp_path / "nothing"), "model.name_or_path")
    assert absolute == (
        f"model.name_or_path={str(tmp_path / 'nothing')!r}: no such directory; point model.name_or_path at a local "
        "model directory or a hub id (org/name)"
    )
    assert f"no such directory (relative to {tmp_path})" in local_dir_problem("./nothing", "model.name_or_path")


def test_the_offline_message_does_not_suggest_offline_mode_when_it_is_on(tmp_path, monkeypatch):
    from dpo_cli.errors import ModelLoadError
    from dpo_cli.modeling import source_kwargs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        source_kwargs("nobody/no-model", None, "config.json", "model.name_or_path")
    msg = str(info.value)
    assert "(offline?)" not in msg and "HF_HUB_OFFLINE=1" not in msg, msg
    assert "HF_HUB_OFFLINE is set, so the Hub is not asked" in msg


def _unfinished_run(tmp_path):
    """A run directory as a run that stopped after its step-2 checkpoint leaves it: no final/."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(make_config([*FAST, *QUIET]), run / ".hydra" / "config.yaml")
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-2" / "trainer_state.json").write_text('{"step": 2}')
    return run


@pytest.mark.integration
def test_mode_eval_of_a_run_without_final_says_the_run_did_not_finish(tmp_path):
    """It said 'the reference ... is unknown' (the run directory) or 'no such directory' (its final/)."""
    from dpo_cli.evalmode import check_reference_known

    run = _unfinished_run(tmp_path)
    for path in (run, run / "final"):
        with pytest.raises(ConfigError) as info:
            check_reference_known(make_config(["mode=eval", "model=pretrained", f"model.name_or_path={path}"]))
        (problem,) = info.value.problems
        assert problem == (
            f"mode=eval: model.name_or_path={str(path)!r}: {run} is a dpo-cli run whose final/ is missing (the run did "
            f"not finish); its latest checkpoint is {run}/checkpoints/step-2: continue the run with train.resume=auto "
            f"hydra.run.dir={run} to write final/, then evaluate {run}/final"
        ), problem
    (run / "final").mkdir()
    directory = f"{run} is a dpo-cli run directory: evaluate its final/, model.name_or_path={run}/final"
    with pytest.raises(ConfigError, match=directory):
        check_reference_known(make_config(["mode=eval", "model=pretrained", f"model.name_or_path={run}"]))


def test_bf16_autocast_on_a_cpu_passes_the_start_up_check_without_warnings(caplog):
    """The check compared bf16-autocast forwards with float32 tolerances: three warnings, each
    'off by' a rounding difference, and the fast path dropped."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dpo_cli import layout
    from dpo_cli.data.prepare import prepare
    from dpo_cli.modeling import byte_tokenizer, load_model

    cfg = make_config([*FAST, *QUIET])
    tokenizer = byte_tokenizer()
    examples = prepare(cfg.data, tokenizer, 0).train[:16]
    AcceleratorState._reset_state(reset_partial_state=True)
    model = Accelerator(mixed_precision="bf16", cpu=True).prepare(load_model(cfg.model, tokenizer, 0))
    choice = layout.choose("auto", 1024, model, sharded=False)
    with caplog.at_level("WARNING", logger="dpo_cli.layout"):
        kept = layout.probe(choice, model, examples, tokenizer.pad_token_id, frozenset(), micro=4)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert not caplog.records, caplog.text
    assert (kept.layout, kept.head is None) == (choice.layout, choice.head is None) == ("shared", False)


# --- inputs that do not resolve: one line, exit 2, nothing created ------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    ("override", "needles"),
    [
        (
            "train.batch_size=${oc.env:HOME}",
            ["train.batch_size=${oc.env:HOME} does not resolve", "could not be converted to Integer", "plain value"],
        ),
        ("train.seed=${train.nope}", ["train.seed=${train.nope} does not resolve", "no key train.nope"]),
        (
            "train.seed=${oc.env:DPO_CLI_TEST_UNSET}",
            ["the environment variable DPO_CLI_TEST_UNSET is not set", "${oc.env:DPO_CLI_TEST_UNSET,DEFAULT}"],
        ),
        ("${train.nope}", ["${train.nope}: ", "an override is KEY=VALUE", "train.seed=${train.nope}"]),
        ("~train", ["~train removed train, which every run needs", "drop ~train", "train.KEY=VALUE"]),
    ],
    ids=["wrong-type", "no-such-key", "unset-variable", "bare-interpolation", "removed-section"],
)
def test_an_input_that_does_not_resolve_is_one_line_not_a_traceback(tmp_path, override, needles):
    proc = run_cli(["dpo-train", *QUIET, *FAST, "train.max_steps=1", override], cwd=tmp_path)
    assert_one_clear_error(proc, *needles)
    assert proc.returncode == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.parametrize(
    "launcher",
    [["accelerate", "launch", "-q", "--multi_gpu", "--num_processes", "2"], ["torchrun", "--nproc_per_node", "2"]],
    ids=["accelerate", "torchrun"],
)
def test_an_indivisible_batch_under_a_launcher_ends_every_process_with_one_line(tmp_path, launcher):
    """Each process exits 2 with the message and no traceback; the launcher's report of the failure
    (its own lines) names the message as the root cause. `accelerate launch -q` prints no
    traceback of its own; torchrun always prints its ChildFailedError."""
    from conftest import free_port

    port_flag = "--main_process_port" if launcher[0] == "accelerate" else "--master_port"
    args = [*launcher, port_flag, str(free_port()), "-m", "dpo_cli", *QUIET, *FAST, "train.batch_size=12"]
    proc = run_cli([*args, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    message = (
        "train.batch_size=12 must be a multiple of train.micro_batch_size x processes = 4 x 2: "
        "set train.batch_size=8 or train.micro_batch_size=3, or launch another number of processes"
    )
    assert proc.returncode != 0 and message in out, out
    root_cause = out.split("Root Cause")[1]
    assert "exitcode  : 2 " in root_cause and message in root_cause, out
    assert "dpo_cli" not in "".join(re.findall(r"Traceback.*?(?=\n\S)", out, re.S)), out  # none of ours
    if launcher[0] == "accelerate":
        assert "Traceback" not in out, out
    assert not (tmp_path / "r").exists()


# --- runs that end before they really start leave nothing behind ----------------------------------


@pytest.mark.integration
def test_a_failed_start_leaves_no_run_directory(tmp_path):
    """The data file is missing: found after Hydra made the run directory, which goes again."""
    proc = run_cli(["dpo-train", "data=hh", "data.path=nowhere.jsonl", *QUIET], cwd=tmp_path)
    assert_one_clear_error(proc, "data.path='nowhere.jsonl'")
    assert proc.returncode == 2
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<time>/ with .hydra/ and train.log


@pytest.mark.integration
def test_a_failed_start_in_an_existing_directory_keeps_it_as_it_was(tmp_path):
    """A missing local data file is one clear error naming the key and the cause (exit 2), and
    the directory the run was given keeps what it held."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine\n")
    proc = run_cli(
        ["dpo-train", "data=hh", "data.path=nowhere.jsonl", *QUIET, f"hydra.run.dir={run_dir}"], cwd=tmp_path
    )
    assert_one_clear_error(proc, "data.path='nowhere.jsonl'", "no such file")
    assert proc.returncode == 2, proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


@pytest.mark.integration
def test_inspect_creates_no_run_directory(tmp_path):
    proc = run_cli(["dpo-train", "mode=inspect", *QUIET, *FAST], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight report" in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []
    proc = run_cli(["dpo-train", "mode=inspect", *QUIET, *FAST, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


# --- train.resume=auto continues a run, never a directory of something else ----------------------


@pytest.mark.integration
def test_resume_auto_refuses_a_directory_that_is_not_a_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    args = ["dpo-train", "train.resume=auto", f"hydra.run.dir={data}", *QUIET, *FAST, "train.max_steps=1"]
    proc = run_cli(args, cwd=tmp_path)
    assert_one_clear_error(proc, f"train.resume=auto: {data} is not a dpo-train run directory", "hydra.run.dir=")
    assert proc.returncode == 2
    assert [p.name for p in data.iterdir()] == ["pairs.jsonl"]


def test_resume_auto_accepts_a_run_an_empty_or_a_new_directory(tmp_path):
    empty, run = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    cli.register()
    for run_dir in (empty, run, tmp_path / "new"):
        argv = overrides.check(["dpo-train", "train.resume=auto", f"hydra.run.dir={run_dir}"], cli.config_dir())
        assert argv[1:3] == ["train.resume=auto", f"hydra.run.dir={run_dir}"]


# --- a sweep never rewrites a finished job's record -----------------------------------------------

SWEEP = ["train.max_steps=1", "train.save_every=1", *QUIET, *FAST, "data.format.num_train=16"]
SWEEP += ["data.format.num_eval=8"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A finished two-job sweep (loss.beta=0.1,0.2) in <tmp>/S."""
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_cli(["dpo-train", "-m", f"hydra.sweep.dir={cwd}/S", "loss.beta=0.1,0.2", *SWEEP], cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd


def _records(sweep_dir) -> dict[str, str]:
    return {
        f"{job}/{name}": (sweep_dir / job / ".hydra" / name).read_text()
        for job in ("0", "1")
        for name in ("config.yaml", "overrides.yaml")
    }


@pytest.mark.integration
def test_a_second_sweep_into_a_used_sweep_directory_is_refused(swept):
    before = _records(swept / "S")
    assert "beta: 0.1" in before["0/config.yaml"]
    multirun = (swept / "S" / "multirun.yaml").read_text()
    proc = run_cli(["dpo-train", "-m", f"hydra.sweep.dir={swept}/S", "loss.beta=0.3,0.4", *SWEEP], cwd=swept)
    assert_one_clear_error(
        proc,
        f"{swept}/S/0",
        f"{swept}/S/1",
        "already holds runs in its job directories",
        "another hydra.sweep.dir",
        "train.resume=auto",
    )
    assert proc.returncode == 2
    assert _records(swept / "S") == before and (swept / "S" / "multirun.yaml").read_text() == multirun
    assert sorted(p.name for p in (swept / "S" / "0" / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]


@pytest.mark.integration
def test_resuming_a_sweep_with_other_values_is_refused(swept):
    before = _records(swept / "S")
    args = ["dpo-train", "-m", f"hydra.sweep.dir={swept}/S", "loss.beta=0.3,0.4", *SWEEP, "train.resume=auto"]
    proc = run_cli(args, cwd=swept)
    assert_one_clear_error(proc, "job 0 (loss.beta=0.3)", "loss.beta: 0.1 there, 0.3 here", "job 1 (loss.beta=0.4)")
    assert proc.returncode == 2
    assert _records(swept / "S") == before


@pytest.mark.integration
def test_the_same_sweep_resumed_continues_and_keeps_each_jobs_record(swept):
    before = _records(swept / "S")
    args = ["dpo-train", "-m", f"hydra.sweep.dir={swept}/S", "loss.beta=0.1,0.2", *SWEEP, "train.resume=auto"]
    proc = run_cli(args, cwd=swept)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the run had already finished at step 1" in proc.stdout + proc.stderr
    assert _records(swept / "S") == before
    for job in ("0", "1"):
        assert "train.resume=auto" in (swept / "S" / job / ".hydra" / "resume-1" / "overrides.yaml").read_text()
