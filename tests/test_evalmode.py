"""`dpo-train mode=eval`: a saved model (full or LoRA adapter) against its reference, without
training, from the command line; generation sharded over two processes; the laptop recipe end
to end with local stand-ins for what it would download."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from conftest import FAST, QUIET, REPO, free_port, read_metrics, run_cli
from test_architectures import save_tiny_model
from test_cli import assert_one_clear_error
from test_evalgen import save_reward_model

GEN = ["judge=sort", "eval.prompts=8", "eval.batch_size=2"]  # generation evaluation (QUIET turns it off)


def _train(args: list[str], run_dir: Path) -> Path:
    """A run from the command line (its run directory keeps the config, as mode=eval reads it)."""
    proc = run_cli(["dpo-train", *QUIET, *FAST, *args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir


def _eval(args: list[str], cwd: Path, out: Path, launcher: list[str] = ()) -> tuple[dict, list[dict]]:
    proc = run_cli([*launcher, *(["-m", "dpo_cli"] if launcher else ["dpo-train"]), "mode=eval", *QUIET, *args,
                    f"hydra.run.dir={out}"], cwd=cwd, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done: evaluation" in proc.stdout + proc.stderr  # the summary
    return json.loads((out / "eval.json").read_text()), read_metrics(out)


def _contents(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones included) and a hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.mark.integration
def test_eval_mode_on_a_runs_final_model_reproduces_its_last_evaluation(tmp_path):
    run_dir = _train(["train.max_steps=4", "model.warm_start.steps=8", *GEN], tmp_path / "run")
    assert (run_dir / "warm_start" / "model.safetensors").is_file()  # the reference is rebuilt from it
    trained = [r for r in read_metrics(run_dir) if "eval_loss" in r][-1]
    before = _contents(run_dir)
    args = [*FAST, *GEN, "logger.report=true", f"model.name_or_path={run_dir / 'final'}"]
    record, rows = _eval(args, tmp_path, tmp_path / "eval")
    (row,) = rows
    assert row["step"] == 0 and record["metrics"] == {k: v for k, v in row.items() if k != "step"}
    assert "initial policy of the run" in record["reference"]
    # The run's reference is rebuilt (same seed, same warm start): the numbers are the run's own.
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen_change"):
        assert row[key] == pytest.approx(trained[key], rel=1e-4, abs=1e-5), key
    for key in ("eval_win_rate", "eval_reference_judge_score", "eval_response_length"):
        assert row[key] == trained[key], key
    assert (tmp_path / "eval" / "samples" / "step-0.jsonl").is_file()
    assert (tmp_path / "eval" / "report.html").is_file()
    # An evaluation into the run's own directory is refused before anything is written there.
    proc = run_cli(["dpo-train", "mode=eval", *QUIET, *FAST, *GEN, f"model.name_or_path={run_dir / 'final'}",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_clear_error(proc, f"{run_dir} holds a training run (final/", "hydra.run.dir=DIR")
    assert _contents(run_dir) == before, "evaluating the run changed its files"


def _responses(path: Path, key: str) -> list[str]:
    return [json.loads(line)[key] for line in path.read_text().splitlines()]


@pytest.mark.integration
def test_eval_mode_on_a_lora_adapter_uses_its_base_as_reference(tmp_path):
    """The reference's samples come from the base model with the adapter off (the eval
    command line sets no model.lora.r: the loaded model says it is an adapter)."""
    args = ["train.max_steps=2", "model.lora.r=4", "optimizer.lr=1e-2", *GEN]
    run_dir = _train(args, tmp_path / "run")
    assert (run_dir / "final" / "adapter_config.json").is_file()
    out = tmp_path / "eval"
    record, (row,) = _eval([*FAST, *GEN, f"model.name_or_path={run_dir / 'final'}"], tmp_path, out)
    assert record["reference"] == "the adapter's base model (adapter off)"
    trained = [r for r in read_metrics(run_dir) if "eval_loss" in r][-1]
    assert row["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)
    # The training run sampled its reference (the base) before any update: the same samples.
    base = _responses(run_dir / "samples" / "reference.jsonl", "response")
    assert _responses(out / "samples" / "reference.jsonl", "response") == base
    # ... which the adapter changed: the policy's own samples differ (else this could not tell).
    assert _responses(out / "samples" / "step-0.jsonl", "policy") != base


@pytest.mark.integration
def test_two_saved_models_head_to_head_with_a_reward_model(tmp_path):
    a = save_tiny_model(tmp_path / "a")
    b = save_tiny_model(tmp_path / "b", hidden_size=32)  # another model, same tokenizer
    rm = save_reward_model(tmp_path / "rm")
    common = [*FAST, *GEN, "judge=reward_model", f"judge.name_or_path={rm}", "eval.max_new_tokens=8"]
    ab, (ab_row,) = _eval(
        [*common, f"model.name_or_path={a}", f"reference.name_or_path={b}"], tmp_path, tmp_path / "ab"
    )
    ba, (ba_row,) = _eval(
        [*common, f"model.name_or_path={b}", f"reference.name_or_path={a}"], tmp_path, tmp_path / "ba"
    )
    assert ab["judge"] == f"reward model {rm}"
    # The same samples and scores from either side: the win rates add up to one.
    assert ab_row["eval_win_rate"] + ba_row["eval_win_rate"] == pytest.approx(1.0)
    assert ab_row["eval_judge_score"] == pytest.approx(ba_row["eval_reference_judge_score"])


@pytest.mark.integration
def test_eval_mode_without_a_known_reference_says_what_to_set(tmp_path):
    model = save_tiny_model(tmp_path / "m")
    proc = run_cli(["dpo-train", "mode=eval", *QUIET, *FAST, f"model.name_or_path={model}",
                    f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path)  # fmt: skip
    assert_one_clear_error(proc, "set reference.name_or_path")


@pytest.mark.integration
@pytest.mark.distributed
def test_generation_sharded_over_two_processes_gives_the_samples_of_one(tmp_path):
    run_dir = _train(["train.max_steps=2", "train.eval_every=null", *GEN], tmp_path / "run")
    args = [*FAST, *GEN, f"model.name_or_path={run_dir / 'final'}"]
    torchrun = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port())]
    _, (two,) = _eval(args, tmp_path, tmp_path / "two", launcher=torchrun)
    _, (one,) = _eval(args, tmp_path, tmp_path / "one")

    def samples(d: Path) -> list[dict]:
        return [json.loads(line) for line in (d / "samples" / "step-0.jsonl").read_text().splitlines()]

    assert samples(tmp_path / "two") == samples(tmp_path / "one")  # 4 batches of 2: two per process
    assert two["eval_win_rate"] == one["eval_win_rate"]


@pytest.mark.integration
def test_the_laptop_recipe_runs_end_to_end_with_local_stand_ins(tmp_path):
    """experiment=smollm2_hh_laptop with what it would download replaced by local files: a tiny
    Llama for SmolLM2, the HH fixture for the hub dataset, a tiny reward model for the judge."""
    model = save_tiny_model(tmp_path / "model", max_position_embeddings=512)
    rm = save_reward_model(tmp_path / "rm")
    proc = run_cli(
        ["dpo-train", "experiment=smollm2_hh_laptop", *QUIET, "judge=reward_model", f"model.name_or_path={model}",
         f"data.path={REPO / 'tests' / 'fixtures' / 'hh_sample.jsonl'}", "data.eval_holdout=4",
         "data.max_train_pairs=null", "data.max_eval_pairs=null", "train.batch_size=4", "train.micro_batch_size=2",
         "train.max_steps=2", "train.eval_every=null", f"judge.name_or_path={rm}", "eval.prompts=4",
         "eval.max_new_tokens=8", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = read_metrics(tmp_path / "run")[-1]
    assert last["step"] == 2 and math.isfinite(last["eval_win_rate"]) and math.isfinite(last["eval_loss"])
    samples = (tmp_path / "run" / "samples" / "step-2.jsonl").read_text().splitlines()
    assert len(samples) == 4 and json.loads(samples[0])["prompt"].startswith("\n\nHuman:")


def test_only_a_training_runs_directory_is_refused_as_the_output(tmp_path):
    """What marks a training run's directory (refused as mode=eval's output), and what does
    not: a new or empty directory, or an earlier evaluation's."""
    from dpo_cli.errors import UserError
    from dpo_cli.evalmode import check_output_dir

    def saved(d: Path, mode: str | None) -> Path:
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text("loss: {beta: 0.1}\n" + (f"mode: {mode}\n" if mode else ""))
        return d

    check_output_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    evaluation = saved(tmp_path / "eval", "eval")
    (evaluation / "metrics.jsonl").write_text('{"step": 0}\n')
    (evaluation / "eval.json").write_text("{}\n")
    check_output_dir(evaluation)
    refused = {
        "trained": saved(tmp_path / "trained", "train"),
        "older": saved(tmp_path / "older", None),  # a config from before `mode` existed
        "final": tmp_path / "final",
        "rows": tmp_path / "rows",
    }
    (refused["final"] / "final").mkdir(parents=True)
    refused["rows"].mkdir()
    (refused["rows"] / "metrics.jsonl").write_text('{"step": 1}\n')
    for d in refused.values():
        with pytest.raises(UserError, match="holds a training run"):
            check_output_dir(d)
