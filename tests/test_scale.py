"""Scale-out without GPUs: the same global batch is the same optimization for any number of
processes and any micro batch; gradient accumulation belongs to dpo-cli under every launcher;
the shipped accelerate configs; launch mistakes get one clear message."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BIN, QUIET, REPO, free_port, read_metrics, run_cli

from dpo_cli import launch
from dpo_cli.launch import grad_norm_of

STEPS = 6
# Batch 8 with a logged row per step: the losses and gradient norms step by step.
COMMON = [
    "train.max_steps=3",
    "train.batch_size=8",
    "logger.log_every=1",
    "train.eval_every=null",
    "data.format.num_train=128",
    "data.format.num_eval=16",
    "model.warm_start.steps=0",  # its weights depend on the number of threads: 1 process is compared with 2 and 4
    *QUIET,
]
# The layouts' runs (one module-scoped launch each, shared): 6 steps, a checkpoint after step 3
# (test_resume_on_another_number_of_processes_keeps_training resumes the 4-process one's).
LAYOUT_RUN = [f"train.max_steps={STEPS}", "train.save_every=3"]
# Batch 8 as 1 process x micro 8, 1 x micro 2 x accumulation 4, 2 processes x micro 2 x 2, and 4
# processes x micro 2 x 1: name -> (processes, micro batch).
LAYOUTS = {"1x8": (1, 8), "1x2x4": (1, 2), "2x2x2": (2, 2), "4x2x1": (4, 2)}


def _launch(
    tmp_path: Path, name: str, processes: int, micro: int, env: dict | None = None, extra: list[str] = ()
) -> subprocess.CompletedProcess:
    run_dir = tmp_path / name
    keys = {e.split("=")[0] for e in extra}  # `extra` replaces COMMON's value of a key
    args = [f"train.micro_batch_size={micro}", f"hydra.run.dir={run_dir}"]
    args += [c for c in COMMON if c.split("=")[0] not in keys] + list(extra)
    if processes == 1:
        cmd = ["dpo-train", *args]
    else:
        cmd = [
            "torchrun",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
            "-m",
            "dpo_cli",
            *args,
        ]
    return run_cli(cmd, cwd=tmp_path, env=env, timeout=600)


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    """The directory holding one run per layout of LAYOUTS (LAYOUT_RUN), each under its name."""
    root = tmp_path_factory.mktemp("layouts")
    for name, (processes, micro) in LAYOUTS.items():
        proc = _launch(root, name, processes, micro, extra=LAYOUT_RUN)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


@pytest.mark.integration
@pytest.mark.distributed
def test_global_batch_is_the_same_optimization_for_any_world_size(layouts):
    """Batch 8 as 1 process x micro 8, 1 x micro 2 x accumulation 4, 2 processes x micro 2 x 2,
    and 4 processes x micro 2 x 1: the same losses and gradient norms at every step."""
    rows = {}
    for name, (processes, micro) in LAYOUTS.items():
        log = (layouts / name / "train.log").read_text()
        accum = 8 // (processes * micro)
        assert f"batch 8 = micro {micro} x accumulation {accum} x processes {processes}" in log
        rows[name] = _train_rows(layouts / name)
    base = rows.pop("1x8")
    assert [r["step"] for r in base] == list(range(1, STEPS + 1))
    for name, got in rows.items():
        assert [r["step"] for r in got] == [r["step"] for r in base], name
        for a, b in zip(base, got, strict=True):
            for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (name, key, a, b)


@pytest.mark.integration
@pytest.mark.distributed
def test_token_mean_terms_do_not_depend_on_how_the_step_is_split(tmp_path):
    """The built-in task's RPO (DPO + a token-mean NLL of the chosen responses), batch 12 sorted
    by length: 1 process x micro 3 x accumulation 4, 1 x micro 12 and 2 processes x micro 3 x 2
    gave step-1 losses 5.07035 / 5.07321 / 5.07080 and grad norms 2.068 / 2.034 / 2.030 when the
    NLL was a mean per micro batch; it is one mean over the step's tokens now."""
    extra = ["loss=rpo", "train.batch_size=12", "train.max_steps=1", "train.sort_by_length=true"]
    rows = {}
    for name, (processes, micro) in {"1x3x4": (1, 3), "1x12": (1, 12), "2x3x2": (2, 3)}.items():
        proc = _launch(tmp_path, name, processes, micro, extra=extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows[name] = _train_rows(tmp_path / name)[0]
    base = rows.pop("1x12")
    for name, row in rows.items():
        for key in ("loss", "grad_norm", "nll_loss"):
            assert row[key] == pytest.approx(base[key], rel=1e-6), (name, key, row[key], base[key])


@pytest.mark.integration
@pytest.mark.distributed
def test_resume_on_another_number_of_processes_keeps_training(layouts, tmp_path):
    """A checkpoint of 4 processes x micro 2 (accumulation 1) at step 3 (the 4x2x1 layout's run),
    resumed by 2 processes x micro 2 x accumulation 2: the same rows as the uninterrupted
    4-process run. accelerate counts micro batches to decide when to synchronize, and the
    checkpoint restored its count (3): the 2-process run then synchronized on the first micro
    batch of every step, so the optimizer step was skipped and the weights never changed again."""
    four = layouts / "4x2x1"
    step3 = four / "checkpoints" / "step-3"
    resumed = _launch(tmp_path, "two", 2, 2, extra=[f"train.max_steps={STEPS}", f"train.resume={step3}"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    want = {r["step"]: r for r in _train_rows(four)}
    got = _train_rows(tmp_path / "two")
    assert [r["step"] for r in got] == [4, 5, 6]
    for row in got:
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert row[key] == pytest.approx(want[row["step"]][key], rel=1e-4, abs=1e-5), (key, row)


@pytest.mark.integration
def test_all_finite_means_every_process(tmp_path):
    """The non-finite guard's vote: one process with a non-finite loss makes every process skip.
    (accelerate's reduce has no "min": asked for one, it summed, so 0 + 1 counted as finite.)"""
    script = tmp_path / "vote.py"
    script.write_text(
        "import torch\n"
        "from accelerate import Accelerator\n"
        "from dpo_cli.guard import all_finite\n"
        "acc = Accelerator(cpu=True)\n"
        "votes = (all_finite(acc, torch.tensor(float(acc.process_index))), all_finite(acc, torch.tensor(1.0)))\n"
        f"open(f'{tmp_path}/vote-{{acc.process_index}}', 'w').write(' '.join(map(str, votes)))\n"
        "acc.end_training()\n"  # tear the process group down: gloo aborts a process left in it
    )
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    votes = [(tmp_path / f"vote-{rank}").read_text() for rank in (0, 1)]
    assert votes == ["False True", "False True"]


@pytest.mark.integration
def test_launcher_accumulation_setting_does_not_scale_the_loss_again(layouts, tmp_path):
    """Known defect: accelerate reads ACCELERATE_GRADIENT_ACCUMULATION_STEPS (set by DeepSpeed
    launches or by hand) and its backward divided the loss by it on top of dpo-cli's own
    division, dividing the gradients (and the logged grad_norm) by the accumulation again. The
    run without the variable: the 1x2x4 layout's (1 process x micro 2 x accumulation 4)."""
    env = {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}  # the same value as the config's 8 / 2
    with_env = _launch(tmp_path, "env", 1, 2, env=env, extra=LAYOUT_RUN)
    assert with_env.returncode == 0, with_env.stderr
    plain = _train_rows(layouts / "1x2x4")
    assert len(plain) == STEPS
    for a, b in zip(plain, _train_rows(tmp_path / "env"), strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6), (a, b)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a, b)


@pytest.mark.integration
def test_launcher_accumulation_that_disagrees_is_refused(tmp_path):
    proc = _launch(tmp_path, "bad", 1, 4, env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert "gradient accumulation to 4" in out and "= 2" in out
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


@pytest.mark.integration
def test_fsdp_launch_without_gpus_says_what_to_change(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the FSDP launch would run")
    proc = run_cli(
        [
            "accelerate", "launch", "--config_file", str(REPO / "scripts/accelerate/fsdp.yaml"), "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "dpo_cli", f"hydra.run.dir={tmp_path / 'run'}", "train.micro_batch_size=4",
            *COMMON,
        ],
        cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # dpo-cli's one line comes first; the launcher then reports that its processes failed.
    first_error = next(line for line in out.splitlines() if "ERROR" in line or "Error" in line)
    assert "asked for FSDP" in first_error and "scripts/accelerate/ddp.yaml" in first_error, out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.integration
def test_batch_that_does_not_divide_across_processes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "dpo_cli"]
    proc = run_cli(
        [*cmd, "train.batch_size=6", "train.micro_batch_size=2", f"hydra.run.dir={run_dir}", *QUIET], tmp_path
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "train.batch_size=6 must be a multiple of train.micro_batch_size x processes = 2 x 2" in out
    assert "set train.batch_size=4 or train.micro_batch_size=1" in out


def test_shipped_accelerate_configs():
    """The configs README names load with accelerate's own reader and ask for what they say."""
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in (REPO / "scripts/accelerate").glob("*.yaml")}
    assert set(configs) == {"ddp", "fsdp", "zero2", "zero3"}
    assert configs["ddp"].distributed_type.value == "MULTI_GPU"
    fsdp = configs["fsdp"]
    assert fsdp.distributed_type.value == "FSDP"
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # the decoder layers
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    for stage in (2, 3):
        ds = configs[f"zero{stage}"]
        assert ds.distributed_type.value == "DEEPSPEED"
        assert ds.deepspeed_config["zero_stage"] == stage
        # Accumulation and clipping come from dpo-cli's config, never from here.
        assert "gradient_accumulation_steps" not in ds.deepspeed_config
        assert "gradient_clipping" not in ds.deepspeed_config
    assert configs["zero3"].deepspeed_config["zero3_save_16bit_model"] is True  # final/ gathered
    for c in configs.values():
        assert c.mixed_precision == "no"  # train.mixed_precision decides


def test_grad_norm_of_a_launcher_that_reports_none():
    """DeepSpeed's clip_grad_norm_ may return None or a float: neither may crash the metrics."""
    assert grad_norm_of(None, "cpu") is None
    assert grad_norm_of(2.5, "cpu").item() == 2.5
    t = torch.tensor(1.5, requires_grad=True) * 1
    assert not grad_norm_of(t, "cpu").requires_grad


@pytest.mark.integration
def test_loop_survives_a_launcher_that_reports_no_grad_norm(train_run, monkeypatch):
    """Under DeepSpeed, accelerate's clip_grad_norm_ may return None (the engine clips): the
    loop trains on, the guard still checks the loss, and the rows leave grad_norm out."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, params, max_norm: None)
    result, run_dir = train_run(["train.max_steps=2", "logger.log_every=1"])
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("grad_norm" not in r for r in rows)


@pytest.mark.integration
def test_wait_for_main_process(tmp_path, capsys):
    """The sbatch template's check that a node reaches the main process: a clear message and
    exit 2 when nothing answers, exit 0 when the port accepts connections. The command as the
    template runs it once; its other answers from the same entry point (launch.main) in process."""
    cmd = [str(BIN / "python"), "-m", "dpo_cli.launch", "wait-for"]
    port = free_port()
    proc = subprocess.run([*cmd, "127.0.0.1", str(port), "--timeout", "2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "cannot reach the main process" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(SystemExit) as bad:
        launch.main(["wait-for", "no-such-host.invalid", "1", "--timeout", "1"])
    assert bad.value.code == 2 and "does not resolve" in capsys.readouterr().err
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        launch.main(["wait-for", "127.0.0.1", str(server.getsockname()[1]), "--timeout", "5"])  # returns: exit 0
    assert capsys.readouterr().err == ""
