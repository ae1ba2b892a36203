"""scripts/gpu/check.sh, the prepared check for a GPU machine, in its CPU form (--device cpu
--dry-run): every stage runs or is skipped with a reason, the kill -9 resume is bit-exact, and the
output folder holds what the device tool can bring back. Plus scripts/gpu/wheels.sh's pins and
the summary's reading of pytest and bench output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench import bench_dry_run_figures

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "scripts" / "gpu" / "check.sh"
STAGES = ["env", "gpu_tests", "head", "bench", "compile", "profile", "resume", "fsdp"]

sys.path.insert(0, str(REPO / "scripts" / "gpu"))
import summary  # noqa: E402  (scripts/gpu is no package)


def _check(out: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    cmd = ["bash", str(CHECK), "--device", "cpu", "--dry-run", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)
    data = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return proc, data


QUICK = STAGES[:6]  # the suite's; the kill-and-resume stages (resume, fsdp) run in make test-all


@pytest.mark.integration
def test_the_cpu_dry_run_passes_every_stage_or_skips_it_with_a_reason(tmp_path):
    proc, data = _check(tmp_path, "--stages", ",".join(QUICK))
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "summary.md").read_text()
    stages = {s["name"]: s for s in data["stages"]}
    assert list(stages) == QUICK
    assert all(s["status"] in ("pass", "skipped") and s["reason"] for s in stages.values()), stages
    assert stages["env"]["status"] == "pass" and data["device"] == "cpu" and data["dry_run"]
    assert stages["compile"] == {**stages["compile"], "status": "skipped"}  # minutes of compiling on a CPU
    assert stages["gpu_tests"]["status"] == "skipped"  # no CUDA here: every gpu test is skipped
    assert all(stages[name]["status"] == "pass" for name in ("head", "bench", "profile"))
    assert {r["way"] for r in data["head"]["rows"]} == {
        "full logits (bf16 GEMM)",
        "chunked, float32 GEMM",
        "chunked, bf16 GEMM",
    }
    assert data["profile"]["step_seconds"] > 0 and data["profile"]["top_cpu"]
    bench_dry_run_figures(json.loads((tmp_path / "bench.json").read_text()))
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# GPU check: PASS") and all(f"| {name} |" in md for name in QUICK)
    assert "## LM head" in md and "## Where a step's time goes" in md and "| qwen05 | 64 | TRL |" in md
    # What the device tool brings back: at most 8 plain files, none in a folder.
    files = list(tmp_path.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files), files


@pytest.mark.slow
@pytest.mark.integration
def test_the_cpu_dry_runs_kill_and_resume_stages_are_bit_equal(tmp_path):
    """The resume stage, and the fsdp stage's launch, kill and resume through the DDP config
    (accelerate runs FSDP only on a GPU, where check.sh skips the stage): a launcher whose worker
    runs in a session of its own is killed whole, and the resumed run is bit-equal to the
    uninterrupted one. Six processes: in make test-all (the suite's other tests kill and resume)."""
    kill_and_resume = STAGES[6:]
    proc, data = _check(
        tmp_path, "--stages", ",".join(kill_and_resume), env={"FSDP_STAGE_CONFIG": "scripts/accelerate/ddp.yaml"}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "summary.md").read_text()
    stages = {s["name"]: s for s in data["stages"]}
    assert list(stages) == kill_and_resume == ["resume", "fsdp"]
    assert stages["resume"]["status"] == "pass" and stages["resume"]["figures"]["exact"] == "bit-equal"
    assert stages["resume"]["figures"]["max_row_diff"] == 0 and stages["resume"]["figures"]["max_weight_diff"] == 0
    assert stages["fsdp"]["status"] == "pass" and stages["fsdp"]["figures"]["exact"] == "bit-equal", stages["fsdp"]
    logs = (tmp_path / "logs.txt").read_text()
    assert "===== resume/runs.log =====" in logs
    assert "accelerate_cli launch --config_file scripts/accelerate/ddp.yaml" in logs


def test_the_fsdp_stage_is_skipped_on_a_cpu_with_its_reason(tmp_path):
    """Without a stand-in config, the fsdp stage says why it does not run on a CPU (and nothing runs)."""
    proc, data = _check(tmp_path, "--stages", "fsdp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (fsdp,) = data["stages"]
    assert fsdp == {**fsdp, "status": "skipped", "reason": "accelerate runs FSDP only on a GPU"}


@pytest.mark.integration
def test_a_usage_mistake_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(["bash", str(CHECK), "--device", "tpu"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.strip() == "check.sh: --device tpu: choose cpu, cuda or auto"


@pytest.mark.integration
def test_the_carried_wheels_are_the_versions_developed_against():
    """wheels.sh --list (no network): every pin is the version installed here, one per package."""
    from importlib.metadata import version

    proc = subprocess.run(["bash", "scripts/gpu/wheels.sh", "--list"], cwd=REPO, capture_output=True, text=True)
    pins = dict(line.split("==") for line in proc.stdout.split())
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "datasets", "trl"} <= pins.keys()
    assert {name: version(name) for name in pins} == pins


@pytest.mark.parametrize(
    ("rc", "last", "status"),
    [
        (0, "3 passed, 1 skipped, 1534 deselected in 9.1s", "pass"),
        (0, "4 skipped, 1534 deselected in 9.1s", "skipped"),
        (5, "1538 deselected in 9.1s", "skipped"),
        (1, "1 failed, 2 passed, 1534 deselected in 9.1s", "fail"),
    ],
)
def test_the_gpu_tests_stage_reads_pytests_last_line(tmp_path, rc, last, status):
    log = tmp_path / "gpu_tests.log"
    log.write_text(f"....\n{last}\n")
    assert summary.judge_gpu_tests(rc, log, {})[0] == status


def test_bench_json_is_rendered_whatever_its_layout():
    rows = [{"tool": "dpo-cli", "pairs_per_s": 12.5, "nested": {"x": 1}}, {"tool": "trl", "pairs_per_s": 3.25}]
    for bench in ({"device": "cuda", "rows": rows}, {"results": {"qwen05": rows}}, {"value": rows}):
        text = "\n".join(summary.bench_section(bench))
        assert "| tool | pairs_per_s |" in text and "| dpo-cli | 12.5 |" in text and "nested" not in text
    assert summary.bench_section({}) == ["No bench.json (see the bench stage)."]
