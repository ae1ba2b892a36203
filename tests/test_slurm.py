"""Jobs on a real SLURM cluster: the sbatch template, the Hydra submitit launcher, a 2-process
job, and preemption (SIGUSR1, requeue, resume) ending exactly where an uninterrupted run does.

`scripts/slurm/local_cluster.sh` starts a one-node cluster on localhost (root, Debian); `.ci/run`
does so before the suite. Its requeue delay (AuthInfo cred_expire) is 15 s instead of Slurm's
120 s default, which only shortens the wait before a requeued job starts again. Without a cluster these tests skip, except in CI, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, FAST, REPO, read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

SBATCH = REPO / "scripts/slurm/dpo.sbatch"
# README's commands for the local cluster ("Trying it on a laptop"), which the tests run with
# LOGGING's settings added. The job: the built-in tiny model and task with its default batch
# (64 pairs), cut to 40 steps: long enough to signal mid-run, short enough for CI.
README_SBATCH = ["train.max_steps=40", "train.eval_every=20"]
README_SWEEP = ["train.max_steps=4", "loss.beta=0.05,0.2"]
# No warm start (its weights depend on the number of threads) and plain DPO (a token-mean NLL term depends on
# how the batch is split): one process is compared with two. No report drawing, no generation evaluation and
# 2560 training pairs (40 steps of 64) of the 16384: the jobs' training rows are compared, and drawing,
# generating, or making and precomputing the reference of 16384 pairs cost more than the rows.
LOGGING = ["logger.log_every=5", "logger=local", "logger.progress=false", "model.warm_start.steps=0", "loss=dpo"]
LOGGING += ["logger.report=false", "judge=none", "data.format.num_train=2560"]
RUN = [*README_SBATCH, *LOGGING]
THROUGHPUT = ("tokens_per_s", "pairs_per_s")


def _cluster_up() -> str | None:
    """None when a SLURM controller answers and a node is ready, else why not."""
    if shutil.which("sbatch") is None:
        return "no SLURM client (sbatch); start a local cluster with: sudo scripts/slurm/local_cluster.sh"
    done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    states = done.stdout.split()
    if done.returncode != 0 or not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        return (
            f"no SLURM node ready (sinfo: {(done.stdout + done.stderr).strip()!r}); run scripts/slurm/local_cluster.sh"
        )
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    reason = _cluster_up()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)


def _env() -> dict[str, str]:
    # The venv's tools first, as after `source .venv/bin/activate`; sbatch exports them to the job.
    # Without WANDB_SERVICE: an earlier in-process W&B test set it to this pytest process's own
    # wandb service, which a job would join instead of starting its own, as a real job does.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def sbatch(out_dir: Path, args: list[str], env: dict | None = None) -> str:
    """Submit the template from the repository root as README shows; returns the job id."""
    cmd = ["sbatch", "--parsable", f"--output={out_dir}/slurm-%j.out", str(SBATCH), *args]
    done = subprocess.run(cmd, cwd=REPO, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_field(job_id: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    for item in shown.stdout.split():
        if item.startswith(field + "="):
            return item.split("=", 1)[1]
    return ""


def state(job_id: str) -> str:
    done = subprocess.run(["squeue", "-j", job_id, "-h", "-t", "all", "-o", "%T %r"], capture_output=True, text=True)
    return done.stdout.strip()


def wait_for(what, timeout: float, every: float = 1.0):
    """Poll `what()` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what.__doc__ or what}")


def wait_done(job_id: str, out_dir: Path, timeout: float = 420) -> None:
    def finished() -> bool:
        """the job to finish"""
        return state(job_id).split(" ")[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY")

    wait_for(finished, timeout)
    logs = "\n".join(p.read_text() for p in out_dir.glob("slurm-*.out"))
    assert state(job_id).startswith("COMPLETED"), (state(job_id), logs[-5000:])


def training_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the throughput columns (wall-clock figures differ between runs)."""
    return [{k: v for k, v in row.items() if k not in THROUGHPUT} for row in read_metrics(run_dir)]


def signal_mid_run(
    job_id: str, run_dir: Path, after_step: int = 10, signal: str = "USR1", scope: tuple[str, ...] = ()
) -> None:
    """Send `signal` once the run has logged `after_step`: to the job's steps (scancel's default), or
    with `scope` ("--batch": the batch shell only; "--full": the shell, its children and the steps)."""

    def trained() -> bool:
        """the run to log step {after_step}"""
        path = run_dir / "metrics.jsonl"
        return path.exists() and any(
            json.loads(line).get("step", 0) >= after_step for line in path.read_text().splitlines()
        )

    wait_for(trained, 300, every=0.2)
    subprocess.run(["scancel", f"--signal={signal}", *scope, job_id], check=True, timeout=30)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The tiny default through sbatch to completion: the run every other test compares with."""
    out = tmp_path_factory.mktemp("sbatch")
    run_dir = out / "run"
    job_id = sbatch(out, [*RUN, f"hydra.run.dir={run_dir}"])
    wait_done(job_id, out)
    return run_dir


def test_readme_shows_the_commands_tested_here():
    readme = (REPO / "README.md").read_text()
    assert f"sbatch scripts/slurm/dpo.sbatch {' '.join(README_SBATCH)}" in readme
    assert f"dpo-train -m hydra/launcher=slurm {' '.join(README_SWEEP)}" in readme


def test_sbatch_runs_the_tiny_default_to_completion(uninterrupted):
    run_dir = uninterrupted
    assert (run_dir / "final" / "config.json").is_file()
    assert training_rows(run_dir)[-1]["step"] == 40
    jobs = [json.loads(line) for line in (run_dir / "slurm.jsonl").read_text().splitlines()]
    assert len(jobs) == 1 and jobs[0]["job_id"].isdigit()
    assert f"SLURM job {jobs[0]['job_id']}" in (run_dir / "train.log").read_text()


def test_sbatch_job_preempted_requeues_itself_and_ends_as_uninterrupted(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job_id = sbatch(tmp_path, [*RUN, f"hydra.run.dir={run_dir}"])
    signal_mid_run(job_id, run_dir)  # then the job requeues itself and starts again (after cred_expire)
    wait_done(job_id, tmp_path)
    assert job_field(job_id, "Restarts") == "1"
    starts = [json.loads(line) for line in (run_dir / "slurm.jsonl").read_text().splitlines()]
    assert [s.get("restart_count", "0") for s in starts] == ["0", "1"]
    log = (run_dir / "train.log").read_text()
    assert "SIGUSR1: stopped after step" in log and f"SLURM job {job_id} requeued" in log
    assert "resuming from its latest checkpoint" in log
    assert training_rows(run_dir) == training_rows(uninterrupted)


# The smallest run that can be signalled mid-way (about 15 s of training here), with W&B offline:
# its service process runs in the step and must survive the warning.
SMALL_STEPS = 20
SMALL = [*FAST, f"train.max_steps={SMALL_STEPS}", "train.eval_every=null", "judge=none", "logger.log_every=1"]
SMALL += ["logger.progress=false", "logger.wandb.mode=offline"]


@pytest.mark.parametrize(
    "scope",
    [
        ("--batch",),  # the batch shell only, as `#SBATCH --signal=B:USR1@120` delivers it
        ("--full",),  # the batch shell, srun and the step's processes at once
    ],
    ids=["batch-shell", "full"],
)
def test_sbatch_job_warned_through_the_batch_shell_requeues_once_and_finishes(tmp_path, scope):
    """A USR1 that reaches the batch shell is passed on to the training, which saves once and
    requeues once; bash's default action (end the script, SLURM then SIGTERMs the step) would stop
    the run at its checkpoint with no requeue."""
    run_dir = tmp_path / "run"
    job_id = sbatch(tmp_path, [*SMALL, f"hydra.run.dir={run_dir}"])
    signal_mid_run(job_id, run_dir, after_step=5, scope=scope)
    wait_done(job_id, tmp_path)
    console = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "Traceback" not in console, console[-5000:]
    assert job_field(job_id, "Restarts") == "1"
    starts = [json.loads(line) for line in (run_dir / "slurm.jsonl").read_text().splitlines()]
    assert [s.get("restart_count", "0") for s in starts] == ["0", "1"]
    log = (run_dir / "train.log").read_text()
    assert log.count("SIGUSR1: stopped after step") == 1 and log.count(f"SLURM job {job_id} requeued") == 1, log
    assert "SIGTERM" not in log and "resuming from its latest checkpoint" in log
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, SMALL_STEPS + 1))
    assert (run_dir / "final" / "config.json").is_file()
    assert "wandb: logging failed" not in log and "wandb: finishing the W&B run failed" not in log


# A main process at the end of a warned run: its W&B run finished, it requeues the job, and the
# requeue's SIGTERM reaches every process of the job, wandb's service among them, before it exits.
REQUEUE_WITH_WANDB = """
import signal, sys, time
import psutil
import wandb
from dpo_cli import slurm

wandb.init(mode="offline", dir=sys.argv[1], project="dpo-cli").finish()
# psutil, not a walk of /proc: a process that ends during the walk once failed it (FileNotFoundError)
children = psutil.Process().children()
assert children, "no wandb service process"
slurm.hand_on(signal.SIGUSR1, None)
for child in children:
    try:
        child.terminate()  # SIGTERM
    except psutil.NoSuchProcess:
        pass
time.sleep(1)
"""


def test_requeue_ends_the_wandb_service_before_slurm_terminates_the_job(tmp_path):
    """A service killed by the requeue's SIGTERM would make wandb's exit hook print a
    ConnectionResetError traceback into slurm-<id>.out; `hand_on` ends it first."""
    env = {**_env(), "SLURM_JOB_ID": "999999999", "WANDB_SILENT": "true"}  # no such job: the requeue fails
    done = subprocess.run(
        [str(BIN / "python"), "-c", REQUEUE_WITH_WANDB, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_sbatch_two_processes(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job_id = sbatch(tmp_path, [*RUN, f"hydra.run.dir={run_dir}"], env={"PROCS_PER_NODE": "2"})
    wait_done(job_id, tmp_path)
    assert "processes: 2" in (run_dir / "train.log").read_text()
    one, two = training_rows(uninterrupted), training_rows(run_dir)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "eval_loss", "rewards/margins"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)


def _sweep(sweep_dir: Path, args: list[str]) -> subprocess.Popen:
    cmd = [str(BIN / "dpo-train"), "-m", "hydra/launcher=slurm", *args, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.Popen(
        cmd, cwd=sweep_dir.parent, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_submitit_sweep_submits_one_job_per_point_sharing_the_reference_cache(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "refcache"
    # One job at a time, so that the second finds the reference log-probs the first cached
    # (the reference does not depend on beta); concurrent jobs would both compute them.
    args = [*README_SWEEP, *LOGGING, "reference.precompute=true", f"reference.cache_dir={cache}"]
    args.append("hydra.launcher.array_parallelism=1")
    proc = _sweep(sweep, args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    jobs = set()
    for n, beta in ((0, 0.05), (1, 0.2)):
        run_dir = sweep / str(n)
        assert (run_dir / "final" / "config.json").is_file(), out
        assert f"beta: {beta}" in (run_dir / ".hydra" / "config.yaml").read_text()
        jobs.add(json.loads((run_dir / "slurm.jsonl").read_text().splitlines()[0])["job_id"])
    assert len(jobs) == 2
    assert "reference log-probs: computed" in (sweep / "0" / "train.log").read_text()
    assert "reference log-probs: cache hit" in (sweep / "1" / "train.log").read_text()


def test_submitit_job_of_two_processes(tmp_path):
    """tasks_per_node=2: one process per task, torch.distributed set up from SLURM's variables."""
    sweep = tmp_path / "sweep"
    args = ["train.max_steps=4", "train.eval_every=null", "logger=local", "hydra.launcher.tasks_per_node=2"]
    # What LOGGING leaves out too: none of it is what this test is about.
    args += ["model.warm_start.steps=0", "logger.report=false", "judge=none", "data.format.num_train=2560"]
    proc = _sweep(sweep, args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    log = (sweep / "0" / "train.log").read_text()
    assert "processes: 2" in log and "batch 64 = micro 32 x accumulation 1 x processes 2" in log
    assert (sweep / "0" / "final" / "config.json").is_file()


def test_submitit_job_preempted_is_requeued_by_submitit_and_resumes(uninterrupted, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, RUN)
    run_dir = sweep / "0"
    record = run_dir / "slurm.jsonl"

    def started() -> str:
        """the job to start"""
        return record.exists() and record.read_text() and json.loads(record.read_text().splitlines()[0])["job_id"]

    job_id = wait_for(started, 300, every=0.2)
    # submitit's warning signal is SIGUSR2 (`--signal=USR2@<signal_delay_s>` in its sbatch script).
    assert "#SBATCH --signal=USR2@120" in next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    signal_mid_run(job_id, run_dir, signal="USR2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert job_field(job_id, "Restarts") == "1"
    log = (run_dir / "train.log").read_text()
    assert "passing SIGUSR2 on to the handler that held it before the run" in log
    assert "resuming from its latest checkpoint" in log
    # The baseline ran under accelerate launch (sbatch template), this job as a plain process
    # (submitit), with another CPU thread count: float sums may differ in the last bits.
    got, want = training_rows(run_dir), training_rows(uninterrupted)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), (a, b)
