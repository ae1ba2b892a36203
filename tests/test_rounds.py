"""task=iterative: pair rules, the rounds' configs and files, the checks before any weights load
(unit tests), and the rounds end to end from the command line: a whole run, and a run stopped by
SIGTERM and killed with -9 mid-round that resumes to the same weights without recomputing what
it saved (integration)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, THROUGHPUT, make_config, read_metrics
from safetensors.torch import load_file

from dpo_cli import config, pairing, roundconfig
from dpo_cli import roundfiles as files
from dpo_cli.errors import EXIT_INTERRUPTED, ConfigError
from dpo_cli.roundconfig import Initial

# --- pair rules -------------------------------------------------------------------------------


def test_best_worst_pairs_the_highest_with_the_lowest_and_drops_ties_and_small_gaps():
    assert pairing.best_worst([0.2, 0.9, 0.1, 0.5], 0.0) == ([(1, 2)], None)
    assert pairing.best_worst([1.0, 1.0, 0.0, 0.0], 0.0) == ([(0, 2)], None)  # the first of equals: deterministic
    assert pairing.best_worst([0.5, 0.5, 0.5], 0.0) == ([], "tie")
    assert pairing.best_worst([0.5, 0.6], 0.2) == ([], "gap")
    assert pairing.best_worst([0.5, 0.75], 0.25) == ([(1, 0)], None)  # a gap of exactly min_gap is kept


def test_all_pairs_are_every_two_samples_apart_by_min_gap_higher_first():
    pairs, why = pairing.all_pairs([0.0, 1.0, 0.5, 1.0], 0.5)
    assert why is None
    assert sorted(pairs) == [(1, 0), (1, 2), (2, 0), (3, 0), (3, 2)]  # (1, 3) is a tie
    assert pairing.all_pairs([1.0, 1.0], 0.0) == ([], "tie")
    assert pairing.all_pairs([1.0, 1.1], 0.5) == ([], "gap")


def test_make_pairs_counts_the_prompts_that_gave_none_by_reason():
    pairs, dropped = pairing.make_pairs([[1, 0], [1, 1], [0.5, 0.4], [0, 0.9]], "best_worst", 0.2)
    assert pairs == [[(0, 1)], [], [], [(1, 0)]]
    assert dropped == {"tie": 1, "gap": 1}


# --- the rounds' configs ----------------------------------------------------------------------

ITERATIVE = ["task=iterative", "judge=sort", "logger.wandb.mode=disabled"]


def _typed(overrides: list[str]):
    return config.validate(make_config([*ITERATIVE, *overrides]), quiet=True)


def test_round_configs_chain_the_rounds_models_and_references(tmp_path):
    run_dir = tmp_path / "run"
    initial = Initial(run_dir / files.ROUNDS / files.INITIAL)
    cfg = _typed(["train.seed=7", "model.lora.r=4"])
    first = roundconfig.round_config(cfg, run_dir, 1, initial)
    assert first.task == "dpo" and first.judge is None and first.train.resume is None and first.train.seed == 7
    assert first.model.name_or_path == str(initial.saved) and first.model.random_init is None
    assert first.model.warm_start.steps == 0 and first.model.lora.r == 4
    assert first.reference.name_or_path is None  # round 1: the initial policy (the base, adapter off)
    assert first.data.path == str(run_dir / "rounds" / "1" / "pairs.jsonl")
    assert first.data.eval_path == str(run_dir / "rounds" / "eval.jsonl")
    assert first.export.merge_lora and first.export.push_to_hub is None  # the next round loads final/merged
    assert (run_dir / "rounds" / "1" / ".hydra" / "config.yaml").is_file()  # where mode=eval finds it
    (run_dir / "rounds" / "1" / "final" / "merged").mkdir(parents=True)
    second = roundconfig.round_config(cfg, run_dir, 2, initial)
    assert second.model.name_or_path == str(run_dir / "rounds" / "1" / "final" / "merged")
    assert second.reference.name_or_path is None and second.train.seed == 8  # previous: its starting policy
    (run_dir / "rounds" / "2" / "checkpoints").mkdir(parents=True)
    assert roundconfig.round_config(cfg, run_dir, 2, initial).train.resume == "auto"  # started: continued
    fixed = roundconfig.round_config(_typed(["iterative.reference=initial"]), run_dir, 2, initial)
    assert fixed.reference.name_or_path == str(initial.saved)
    assert fixed.logger.wandb.name == "run-round-2" and fixed.logger.wandb.group == "run"


def test_the_plan_says_what_the_rounds_cost():
    cfg = _typed(["iterative.rounds=3", "iterative.prompts=100", "iterative.samples=4", "train.max_steps=10"])
    text = roundconfig.plan(cfg, 5000, "exact")
    assert "rounds: 3" in text
    assert "400 responses" in text and f"at most {400 * cfg.eval.max_new_tokens} new tokens" in text
    assert "at most 100 per round" in text
    assert "1200 sampled responses" in text and "30 optimizer steps" in text
    every = roundconfig.plan(_typed(["iterative.pairs=all", "iterative.samples=4"]), 10, "exact")
    assert "at most 60 per round" in every  # 10 prompts x 4*3/2 pairs


def test_steps_of_a_round_follow_the_train_section():
    assert (
        roundconfig.steps_of(_typed(["train.max_steps=5", "train.batch_size=8", "train.micro_batch_size=8"]), 20) == 5
    )
    assert roundconfig.steps_of(_typed(["train.max_steps=5", "train.batch_size=8", "train.micro_batch_size=8"]), 7) == 0
    epochs = _typed(["train.max_steps=null", "train.epochs=2", "train.batch_size=8", "train.micro_batch_size=8"])
    assert roundconfig.steps_of(epochs, 20) == 4


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["judge=none"], "task=iterative scores the policy's samples with a judge"),
        (["iterative.samples=1"], "iterative.samples=1 must be >= 2"),
        (["iterative.pairs=best_random"], "iterative.pairs='best_random' is not one of best_worst, all"),
        (["iterative.reference=sft"], "iterative.reference='sft' is not one of previous, initial"),
        (["iterative.min_gap=-1"], "iterative.min_gap=-1.0 must be >= 0"),
        (["iterative.temperature=0"], "iterative.temperature=0.0 must be > 0"),
        (["loss=kto"], "task=iterative trains a paired DPO-family loss"),
        (["train.resume=outputs/x/checkpoints/step-4"], "task=iterative resumes its rounds with train.resume=auto"),
        (["eval.generate_every=8"], "task=iterative evaluates generation after each round"),
    ],
)
def test_iterative_settings_are_checked_before_any_weights_load(overrides, expected):
    cfg = make_config([*ITERATIVE, *overrides])
    with pytest.raises(ConfigError) as e:
        config.validate(cfg, quiet=True, command_line=[*ITERATIVE, *overrides])
    assert expected in str(e.value)


def test_iterative_keys_without_the_task_are_refused():
    cfg = make_config(["iterative.rounds=5"])
    with pytest.raises(ConfigError) as e:
        config.validate(cfg, quiet=True, command_line=["iterative.rounds=5"])
    assert "iterative.* is read by task=iterative only" in str(e.value)


def test_a_multi_process_launch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as e:
        config.validate(make_config(ITERATIVE), quiet=True, command_line=ITERATIVE)
    assert "task=iterative runs in one process for now (2 launched)" in str(e.value)


# --- the rounds' files --------------------------------------------------------------------------


def test_the_runs_metrics_are_the_rounds_on_one_step_count_and_rebuilt_whole(tmp_path):
    for n, steps in ((1, 3), (2, 2)):
        d = files.round_dir(tmp_path, n)
        files.write_jsonl(d / "metrics.jsonl", [{"step": s, "loss": float(n)} for s in range(1, steps + 1)])
        files.write_json(d / files.DONE, {"steps": steps, "stats": {"round/pairs": 10 * n}, "eval": {"eval_x": n}})
    files.write_json(files.round_dir(tmp_path, 1) / files.TRAINED, {"steps": 3})
    rows = files.compose_metrics(tmp_path, 3)  # round 3 is not done: left out
    assert [(r["step"], r["round"]) for r in rows] == [
        (0, 1), (1, 1), (2, 1), (3, 1), (3, 1), (3, 2), (4, 2), (5, 2), (5, 2)
    ]  # fmt: skip
    assert rows[4] == {"step": 3, "round": 1, "eval_x": 1} and rows[5]["round/pairs"] == 20
    assert files.compose_metrics(tmp_path, 3) == rows == read_metrics(tmp_path)  # no row twice
    assert files.trained_steps(tmp_path, 2) == 3


def test_a_resume_with_other_round_settings_is_refused(tmp_path):
    from dpo_cli import rounds
    from dpo_cli.errors import UserError

    rounds._check_plan(_typed(["iterative.samples=4"]), tmp_path, "exact")
    rounds._check_plan(_typed(["iterative.samples=4", "iterative.rounds=9"]), tmp_path, "exact")  # more rounds: fine
    with pytest.raises(UserError) as e:
        rounds._check_plan(_typed(["iterative.samples=8"]), tmp_path, "exact")
    assert "holds rounds made with other settings" in str(e.value) and "samples" in str(e.value)


# --- end to end, from the command line ------------------------------------------------------------

RUN = [
    *ITERATIVE, "debug=default", "loss=dpo", "logger.progress=false", "logger.report=false",
    "iterative.rounds=2", "iterative.prompts=128", "iterative.samples=4", "model.warm_start.steps=96",
    "data.format.min_digits=2", "data.format.max_digits=3", "eval.max_new_tokens=8",
    "train.max_steps=6", "train.save_every=2", "train.eval_every=null", "train.batch_size=4", "train.micro_batch_size=4",
    "eval.prompts=8",
]  # fmt: skip


def _start(run_dir: Path, extra: list[str] = ()) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [str(BIN / "dpo-train"), *RUN, *extra, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.01)
    raise AssertionError(f"no {path} after {timeout} s")


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("iterative") / "run"
    proc = _start(run_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return run_dir, out


@pytest.mark.integration
def test_a_run_trains_its_rounds_and_ends_with_the_last_rounds_model(full):
    run_dir, out = full
    assert "rounds: 2 (task=iterative" in out and "done: 2 rounds, 12 optimizer steps" in out
    for n in (1, 2):
        d = files.round_dir(run_dir, n)
        samples, scores = files.read_jsonl(d / files.SAMPLES), files.read_jsonl(d / files.SCORES)
        assert len(samples) == 128 and all(len(s["responses"]) == 4 for s in samples)
        assert all(set(s["verdicts"]) <= {"correct", "misordered", "miscopied", "other"} for s in scores)
        pairs = files.read_jsonl(d / files.PAIRS)
        assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
        assert len(pairs) == files.read_json(d / files.DONE)["stats"]["round/pairs"]
        assert (d / "final" / "model.safetensors").is_file()
    a, b = (load_file(p / "model.safetensors") for p in (run_dir / "final", files.round_dir(run_dir, 2) / "final"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_metrics(run_dir)
    assert max(r["step"] for r in rows) == 12 and {r["round"] for r in rows} == {1, 2}
    evals = [r for r in rows if "eval_win_rate" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[0]["eval_reference_judge_score"] == evals[1]["eval_reference_judge_score"]  # one initial policy
    assert "iterative DPO: 2 rounds" in (run_dir / "final" / "README.md").read_text()


@pytest.mark.integration
def test_sigterm_and_kill_9_mid_round_resume_to_the_same_weights_recomputing_nothing_saved(tmp_path, full):
    full_dir, _ = full
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for(files.round_dir(run_dir, 1) / files.PAIRS, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "in round 1;" in out and f"train.resume=auto hydra.run.dir={run_dir}" in out and "Traceback" not in out
    saved = files.round_dir(run_dir, 1) / files.SAMPLES
    stamp = saved.stat().st_mtime_ns
    proc = _start(run_dir, ["train.resume=auto"])
    _wait_for(files.round_dir(run_dir, 2) / "checkpoints" / "step-2", proc)
    proc.kill()
    proc.wait()
    proc = _start(run_dir, ["train.resume=auto"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "round 1: the samples saved in" not in out  # round 1 was complete: not even read again
    assert "round 2: the samples saved in" in out and saved.stat().st_mtime_ns == stamp
    for n in (1, 2):
        for name in (files.SAMPLES, files.SCORES, files.PAIRS):
            assert (files.round_dir(run_dir, n) / name).read_text() == (files.round_dir(full_dir, n) / name).read_text()
    a, b = (load_file(d / "final" / "model.safetensors") for d in (full_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def exact(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k not in THROUGHPUT} for row in rows]

    assert exact(read_metrics(run_dir)) == exact(read_metrics(full_dir))


def test_inspect_reports_the_round_plan():
    from dpo_cli import preflight

    cfg = config.validate(make_config([*RUN, "mode=inspect"]), quiet=True)
    text = preflight.run(cfg)
    assert "rounds: 2 (task=iterative; 2 per job)" in text and "1024 sampled responses (at most 8192 tokens)" in text
