#!/usr/bin/env python
"""kill -9 and resume, as scripts/gpu/check.sh's `resume` and `fsdp` stages run it.

    python scripts/gpu/resume_check.py --json result.json --work DIR [--launch CONFIG] -- OVERRIDES...

Runs of the same config (OVERRIDES, which must set train.max_steps), each in its own run directory:
  full     uninterrupted to train.max_steps;
  resumed  a process that, once its step-K checkpoint is written (--kill-after K), writes a marker and
           waits; this script then kills its whole process group with SIGKILL (as an OOM kill or a
           lost node would), and `train.resume=auto` continues the run to max_steps in a fresh process;
  again    only when full and resumed differ: a second uninterrupted run. GPU kernels may be
           nondeterministic; the resumed run's difference is then judged against this run-to-run
           difference (pass if it is no larger).
The metric rows (metrics.jsonl, throughput aside) and the final weights are compared for bit
equality. With --launch CONFIG every run starts through `accelerate launch --config_file CONFIG
--num_processes 1` (the fsdp stage: scripts/accelerate/fsdp.yaml).

Exit 0: the resume is exact (or within the run-to-run difference); 1: it is not, or a run failed.
The JSON result has the verdict, the figures and a one-line reason either way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

# Keys that measure time or memory, not what was computed: never compared.
TIMING_KEYS = ("tokens_per_s", "pairs_per_s", "mfu")


def _pause_after(step: int, marker: Path) -> None:
    """In the child: once checkpoint `step` is saved, write `marker` and wait to be killed. The
    loop looks `checkpoint.save` up on the package at call time (dpo_cli/parts.py), so wrapping
    it there is enough; the wait keeps the kill at a known point instead of a race with a fast
    loop."""
    from dpo_cli import checkpoint

    real = checkpoint.save

    def save(accelerator, run_dir, done, *args, **kwargs):
        path = real(accelerator, run_dir, done, *args, **kwargs)
        if done == step:
            if int(os.environ.get("RANK", "0")) == 0:
                marker.write_text(str(path))
            time.sleep(600)  # killed long before this ends; bounded, should the killer itself die
        return path

    checkpoint.save = save


def child(argv: list[str]) -> None:
    """`--child K MARKER OVERRIDES...`: dpo-train with OVERRIDES, stopping after checkpoint K."""
    step, marker, overrides = int(argv[0]), Path(argv[1]), argv[2:]
    _pause_after(step, marker)
    from dpo_cli.cli import main

    sys.argv = ["dpo-train", *overrides]
    main()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """Starts dpo-train (or the pausing child) directly or through accelerate launch, logging to one file."""

    def __init__(self, overrides: list[str], launch: str | None, log: Path, timeout: float):
        self.overrides, self.launch, self.log, self.deadline = overrides, launch, log, time.time() + timeout

    def command(self, target: list[str]) -> list[str]:
        if self.launch is None:
            return [sys.executable, *target]
        accelerate = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
        accelerate += ["--config_file", self.launch, "--num_processes", "1", "--main_process_port", str(free_port())]
        return [*accelerate, *target]

    def start(self, target: list[str], name: str) -> subprocess.Popen:
        cmd = self.command(target)
        with self.log.open("a") as f:
            f.write(f"\n--- {name}: {' '.join(cmd)}\n")
        out = self.log.open("a")
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, proc: subprocess.Popen, name: str) -> None:
        try:
            code = proc.wait(timeout=max(1.0, self.deadline - time.time()))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise RunFailed(f"{name} did not finish within the stage's time") from None
        if code != 0:
            raise RunFailed(f"{name} exited {code} (see its log)")

    def train(self, run_dir: Path, name: str, extra: list[str] = ()) -> None:
        target = ["-m", "dpo_cli", *self.overrides, *extra, f"hydra.run.dir={run_dir}"]
        self.wait(self.start(target, name), name)

    def train_and_kill(self, run_dir: Path, step: int) -> None:
        """Start a run that stops after checkpoint `step`, SIGKILL it there; returns when killed."""
        marker = run_dir.parent / f"{run_dir.name}.paused"
        target = [str(Path(__file__).resolve()), "--child", str(step), str(marker)]
        target += [*self.overrides, f"hydra.run.dir={run_dir}"]
        proc = self.start(target, f"resumed: run to checkpoint {step}, then SIGKILL")
        while not marker.exists():
            if proc.poll() is not None:
                raise RunFailed(f"the run to be killed exited {proc.returncode} before its step-{step} checkpoint")
            if time.time() > self.deadline:
                kill_tree(proc)
                raise RunFailed(f"no step-{step} checkpoint within the stage's time")
            time.sleep(0.05)
        killed = kill_tree(proc)
        with self.log.open("a") as f:
            f.write(f"--- killed with SIGKILL after {marker.read_text()}: {killed} processes\n")


class RunFailed(Exception):
    pass


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL `proc` and every process below it, at once; returns how many. torchrun (under
    accelerate launch) starts its workers in sessions of their own, so killing the launcher's
    process group alone would leave a worker running, holding the run directory."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def row_difference(a: list[dict], b: list[dict]) -> tuple[float, str | None]:
    """The largest |difference| between the two runs' metric values (timing keys aside), and
    why they are not comparable at all (other steps or keys), if they are not."""
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return math.inf, f"other steps: {[r['step'] for r in a]} vs {[r['step'] for r in b]}"
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        keys = x.keys() - set(TIMING_KEYS)
        if keys != y.keys() - set(TIMING_KEYS):
            return math.inf, f"step {x['step']}: other keys: {sorted(keys ^ (y.keys() - set(TIMING_KEYS)))}"
        for k in keys:
            if x[k] == y[k]:
                continue
            if isinstance(x[k], (int, float)) and isinstance(y[k], (int, float)):
                worst = max(worst, abs(x[k] - y[k]) if math.isfinite(x[k] - y[k]) else math.inf)
            else:
                return math.inf, f"step {x['step']}: {k} is {x[k]!r} vs {y[k]!r}"
    return worst, None


def weight_difference(a: Path, b: Path) -> float:
    """The largest |difference| between the two runs' final weights (every safetensors file in final/)."""
    from safetensors.torch import load_file

    def load(d: Path) -> dict:
        out = {}
        for f in sorted((d / "final").glob("*.safetensors")):
            out.update(load_file(f))
        return out

    wa, wb = load(a), load(b)
    if wa.keys() != wb.keys() or not wa:
        return math.inf
    return max((wa[k].float() - wb[k].float()).abs().max().item() if wa[k].numel() else 0.0 for k in wa)


def compare(full: Path, resumed: Path, runner: Runner, work: Path) -> dict:
    d_rows, why = row_difference(rows(full), rows(resumed))
    d_weights = weight_difference(full, resumed)
    result = {"max_row_diff": d_rows, "max_weight_diff": d_weights, "rows": len(rows(full))}
    if why:
        return {**result, "status": "fail", "reason": f"resumed run differs from the uninterrupted one: {why}"}
    if d_rows == 0 and d_weights == 0:
        return {
            **result,
            "status": "pass",
            "exact": "bit-equal",
            "reason": "resumed run bit-equal to the uninterrupted one",
        }
    # Not bit-equal: how far apart are two uninterrupted runs on this device?
    again = work / "again"
    runner.train(again, "again: uninterrupted, a second time")
    noise_rows, why = row_difference(rows(full), rows(again))
    noise_weights = weight_difference(full, again)
    result.update(run_to_run_row_diff=noise_rows, run_to_run_weight_diff=noise_weights)
    if not why and d_rows <= noise_rows and d_weights <= noise_weights:
        reason = (
            f"resumed run not bit-equal (rows {d_rows:.3g}, weights {d_weights:.3g}) but within two "
            f"uninterrupted runs' own difference (rows {noise_rows:.3g}, weights {noise_weights:.3g})"
        )
        return {**result, "status": "pass", "exact": "within run-to-run", "reason": reason}
    reason = (
        f"resumed run differs (rows {d_rows:.3g}, weights {d_weights:.3g}) by more than two uninterrupted "
        f"runs do (rows {noise_rows:.3g}, weights {noise_weights:.3g}{'; ' + why if why else ''})"
    )
    return {**result, "status": "fail", "exact": "no", "reason": reason}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit(
            "usage: resume_check.py --json FILE --work DIR [--kill-after K] [--launch CONFIG] -- OVERRIDES"
        )
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where the result goes")
    parser.add_argument("--work", type=Path, required=True, help="a directory for the run directories and the log")
    parser.add_argument("--kill-after", type=int, default=3, help="the checkpoint after which the run is killed")
    parser.add_argument("--launch", default=None, help="an accelerate config file: start every run through it")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for all runs together")
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 0
    args, overrides = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "runs.log"
    runner = Runner(overrides, args.launch, log, args.timeout)
    full, resumed = args.work / "full", args.work / "resumed"
    t0 = time.time()
    try:
        runner.train(full, "full: uninterrupted")
        runner.train_and_kill(resumed, args.kill_after)
        killed_rows = len(rows(resumed))
        runner.train(resumed, "resumed: train.resume=auto", ["train.resume=auto"])
        result = compare(full, resumed, runner, args.work)
        result["rows_before_kill"] = killed_rows
    except (RunFailed, FileNotFoundError) as e:
        result = {"status": "fail", "reason": str(e)}
    result.update(kill_after=args.kill_after, launch=args.launch, seconds=round(time.time() - t0, 1), log=str(log))
    # JSON has no inf: a difference that is not a number (other steps, other keys) is written as null.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    args.json.write_text(json.dumps(clean, indent=2) + "\n")
    print(f"{result['status']}: {result['reason']}")
    return 0 if result["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
