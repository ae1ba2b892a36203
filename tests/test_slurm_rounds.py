"""task=iterative as a chain of SLURM jobs on a real cluster: with iterative.rounds_per_job=1 each
job trains one round and submits the next (scripts/slurm/dpo.sbatch), which continues the run
directory; the chain ends with the run's final/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_rounds import RUN as ROUNDS_RUN
from test_slurm import cluster, sbatch, wait_done  # noqa: F401 - cluster: the module's autouse fixture

from dpo_cli import roundfiles as files

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


def test_sbatch_chain_trains_one_round_per_job_and_submits_the_next(tmp_path):
    run_dir = tmp_path / "run"
    out = tmp_path / "logs"
    out.mkdir()
    chain = {"CHAIN_SBATCH_ARGS": f"--output={out}/slurm-%j.out"}
    first = sbatch(out, [*ROUNDS_RUN, "iterative.rounds_per_job=1", f"hydra.run.dir={run_dir}"], env=chain)
    wait_done(first, out, timeout=420)
    log = (out / f"slurm-{first}.out").read_text()
    found = re.search(r"submitted job (\d+), which continues it", log)
    assert found, log[-3000:]
    second = found.group(1)
    assert (files.round_dir(run_dir, 1) / files.DONE).is_file() and not (files.round_dir(run_dir, 2)).exists()
    assert (run_dir / files.ROUNDS / files.PENDING).read_text() == "2\n"
    wait_done(second, out, timeout=420)
    later = (out / f"slurm-{second}.out").read_text()
    assert "submitted job" not in later  # the last round: no third job
    assert (files.round_dir(run_dir, 2) / files.DONE).is_file() and (run_dir / "final" / "model.safetensors").is_file()
    assert not (run_dir / files.ROUNDS / files.PENDING).exists()
    assert Path(run_dir / "metrics.jsonl").is_file()
