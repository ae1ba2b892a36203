"""`dpo-train` as a user runs it: errors, offline behaviour, multi-process launches, the wheel."""

from __future__ import annotations

import re
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from conftest import BIN, FAST, QUIET, REPO, free_port, read_metrics, run_cli, train_once

from dpo_cli import cli


def assert_one_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, (needle, out)


@pytest.mark.integration
def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = run_cli(["dpo-train", "model=llama", "data=hh", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name_or_path: meta-llama/Llama-3.2-1B-Instruct" in proc.stdout
    assert "hub_id: Anthropic/hh-rlhf" in proc.stdout


@pytest.mark.integration
def test_bad_values_are_reported_together_before_loading(tmp_path):
    proc = run_cli(
        [
            "dpo-train",
            "loss.beta=-1",
            "train.batch_size=10",
            "data.max_prompt_length=64",
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=tmp_path,
    )
    assert_one_clear_error(proc, "loss.beta=-1.0 must be > 0", "train.batch_size=10", "data.max_prompt_length=64")
    assert proc.returncode == 2
    assert not (tmp_path / "r" / "final").exists()


@pytest.mark.integration
def test_unknown_key_fails_at_compose(tmp_path):
    proc = run_cli(["dpo-train", "train.bath_size=4"], cwd=tmp_path)
    assert_one_clear_error(proc, "bath_size")


@pytest.mark.integration
@pytest.mark.parametrize(
    "env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],  # offline mode; hub unreachable
    ids=["offline-mode", "unreachable"],
)
def test_uncached_hub_model_fails_fast_with_a_fix(tmp_path, env):
    start = time.monotonic()
    proc = run_cli(
        ["dpo-train", "model=llama", "data=hh", f"hydra.run.dir={tmp_path}/r"],
        cwd=tmp_path,
        env={"HF_HOME": str(tmp_path / "hf"), **env},
    )
    assert_one_clear_error(proc, "meta-llama/Llama-3.2-1B-Instruct", "model.name_or_path=DIR")
    assert time.monotonic() - start < 60  # the hub client alone retries for ~30 s


def _two_process_run(launcher: list[str], tmp_path: Path) -> Path:
    run_root = tmp_path / "outputs"
    # A port of its own, so that a run never collides with a previous one's socket.
    port_flag = "--main_process_port" if launcher[0] == "accelerate" else "--master_port"
    proc = run_cli(
        [
            *launcher,
            port_flag,
            str(free_port()),
            "-m",
            "dpo_cli",
            "train.max_steps=4",
            *QUIET,
            *FAST,
            f"hydra.run.dir={run_root}/${{run_stamp:}}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "terminate called" not in out
    # Both processes composed `${run_stamp:}` themselves and still agreed on one directory.
    run_dirs = [p.parent for p in run_root.glob("*/*/metrics.jsonl")]
    assert len(run_dirs) == 1, list(run_root.rglob("*"))
    log = (run_dirs[0] / "train.log").read_text()
    assert "processes: 2" in log
    return run_dirs[0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The single-process run (4 steps) that each launcher's two processes are compared with."""
    return train_once(tmp_path_factory.mktemp("one-process") / "single", ["train.max_steps=4"])[1]


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.parametrize(
    "launcher",
    [["accelerate", "launch", "--multi_gpu", "--num_processes", "2"], ["torchrun", "--nproc_per_node", "2"]],
    ids=["accelerate", "torchrun"],
)
def test_two_processes_match_one(launcher, tmp_path, one_process):
    """Two CPU processes on gloo with the same global batch give the single-process numbers."""
    two = read_metrics(_two_process_run(launcher, tmp_path))
    one = read_metrics(one_process)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "eval_loss", "rewards/margins", "eval_rewards/accuracies", "grad_norm"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (key, a, b)


@pytest.mark.integration
def test_wheel_ships_conf_and_runs_from_any_directory(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [str(BIN / "pip"), "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(REPO)],
        check=True,
        capture_output=True,
    )
    wheel = next(wheel_dir.glob("dpo_cli-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    conf_files = {str(p.relative_to(REPO)) for p in (REPO / "conf").rglob("*.yaml")}
    assert {"dpo_cli/" + n for n in conf_files} <= set(names)

    # Install the wheel alone into a directory that shadows the source checkout.
    site = tmp_path / "site"
    subprocess.run([str(BIN / "pip"), "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": str(BIN)}
    dpo_train = str(site / "bin" / "dpo-train")  # the console script the wheel installed
    job = subprocess.run([dpo_train, "--cfg", "job"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    assert "model_type: llama" in job.stdout
    info = subprocess.run([dpo_train, "--info", "searchpath"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert f"file://{site / 'dpo_cli' / 'conf'}" in info.stdout, info.stdout


def _readme_commands() -> list[list[str]]:
    """Every `dpo-train ...` and `... -m dpo_cli ...` command in README's code blocks, as
    lists of Hydra arguments."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a command continued with "\" is one line
            line = line.split(" #")[0].strip().removeprefix("$ ")
            m = re.search(r"(?:^|\s)(?:dpo-train|-m dpo_cli)(\s.*|$)", line)
            if m and not line.startswith(("pip", "make")):
                commands.append(m.group(1).split())
    return commands


def test_every_readme_command_composes_and_validates():
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dpo_cli.config import validate

    commands = _readme_commands()
    assert len(commands) >= 5, commands
    cli.register()
    parser = OverridesParser.create()
    checked = set()  # each distinct composition once: a command without a sweep, or repeated, is one
    for args in commands:
        args = [a for a in args if a not in ("-m", "--multirun")]
        args = cli.pretrained_by_default(["dpo-train", *args])[1:]  # what `dpo-train` does before Hydra
        if "--cfg" in args:
            args = args[: args.index("--cfg")]
        # A sweep (`loss.beta=0.05,0.1`) composes once per value; check the first and last.
        overrides = parser.parse_overrides(args)
        for pick in (0, -1):
            chosen = []
            for o in overrides:
                if o.is_sweep_override():
                    values = list(o.sweep_string_iterator())
                    chosen.append(f"{o.get_key_element()}={values[pick]}")
                else:
                    chosen.append(o.input_line)
            if tuple(chosen) in checked:
                continue
            checked.add(tuple(chosen))
            with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
                cfg = compose(config_name="config", overrides=chosen)
            validate(cfg)


@pytest.mark.integration
def test_readme_lists_every_metric_written(train_run):
    _, run_dir = train_run(["train.max_steps=2", "train.eval_every=1"])
    readme = (REPO / "README.md").read_text()
    keys = {k for row in read_metrics(run_dir) for k in row}
    missing = sorted(k for k in keys if f"`{k}`" not in readme and f"`{k.removeprefix('eval_')}`" not in readme)
    assert not missing, f"metrics written but not documented in README: {missing}"


@pytest.mark.integration
@pytest.mark.parametrize(
    "env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
    ids=["offline-mode", "unreachable"],
)
def test_uncached_hub_dataset_fails_fast_with_a_fix(tmp_path, env):
    start = time.monotonic()
    proc = run_cli(
        ["dpo-train", "data=hh", f"hydra.run.dir={tmp_path}/r"],
        cwd=tmp_path,
        env={"HF_HOME": str(tmp_path / "hf"), **env},
    )
    assert_one_clear_error(proc, "Anthropic/hh-rlhf", "data.path=/path/to/train.jsonl.gz")
    assert time.monotonic() - start < 60
