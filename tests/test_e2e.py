"""End to end on the built-in tiny model: the real loop, data, checkpoints and outputs."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import make_config, read_metrics, train_once
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_cli.errors import ConfigError, UserError
from dpo_cli.modeling import load_model, load_tokenizer

THROUGHPUT = {"tokens_per_s", "pairs_per_s"}
# One short run that many tests read (and copy before changing): 4 steps, evaluated and saved
# every 2, every checkpoint kept, the reports drawn.
SHORT = ["train.max_steps=4", "train.eval_every=2", "train.save_every=2", "train.keep_checkpoints=null"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """(result, run_dir) of SHORT, trained once for the module; tests must not change run_dir."""
    return train_once(tmp_path_factory.mktemp("short") / "run", [*SHORT, "logger.report=true"])


@pytest.fixture
def short_copy(short_run, tmp_path):
    """A copy of the short run's directory, for a test that continues or changes it."""
    run_dir = tmp_path / "r"
    shutil.copytree(short_run[1], run_dir)
    return run_dir


@pytest.mark.integration
def test_short_run_trains_every_parameter_and_writes_outputs(short_run):
    result, run_dir = short_run

    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_rows] == [2, 4]
    for r in train_rows:
        for key in (
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "logits/chosen",
            "logits/rejected",
            "grad_norm",
            "lr",
            "tokens_per_s",
            "pairs_per_s",
        ):
            assert math.isfinite(r[key]), (key, r)
    # Policy equals reference before the first update: the first loss is exactly log 2.
    assert abs(train_rows[0]["loss"] - math.log(2)) < 1e-6
    assert result["eval_loss"] == eval_rows[-1]["eval_loss"]

    # final/ is a Hugging Face model + tokenizer, and every trainable parameter moved.
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    AutoTokenizer.from_pretrained(run_dir / "final")
    cfg = make_config([])
    initial = load_model(cfg.model, load_tokenizer(cfg.model), cfg.train.seed)
    trained = dict(final.named_parameters())
    for name, p in initial.named_parameters():
        assert not torch.equal(p, trained[name]), f"{name} did not change"

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "checkpoints" / "step-4" / "trainer_state.json").is_file()


@pytest.mark.integration
def test_resume_reproduces_an_uninterrupted_run(train_run, tmp_path):
    args = [
        "train.max_steps=6",
        "train.save_every=3",
        "train.eval_every=3",
        "train.keep_checkpoints=null",
        "logger.log_every=3",  # logged rows average over 3 steps: the window must restart alike
    ]
    _, full_dir = train_run(args, tmp_path / "full")

    # A second run that logged everything but whose last checkpoint is step 3 (it died while
    # saving step 6), then resumes: rows after step 3 are dropped and computed again.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_dir / "checkpoints" / "step-3", resumed_dir / "checkpoints" / "step-3")
    full = read_metrics(full_dir)
    shutil.copy(full_dir / "metrics.jsonl", resumed_dir / "metrics.jsonl")
    train_run([*args, "train.resume=auto"], resumed_dir)

    resumed = read_metrics(resumed_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed, strict=True):
        for key in a.keys() - THROUGHPUT:
            assert a[key] == b[key] or abs(a[key] - b[key]) < 1e-6, (key, a, b)
    final_a = AutoModelForCausalLM.from_pretrained(full_dir / "final").state_dict()
    final_b = AutoModelForCausalLM.from_pretrained(resumed_dir / "final").state_dict()
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], rtol=0, atol=1e-6)


@pytest.mark.integration
def test_default_run_learns_the_builtin_task(train_run):
    """The run `make train` does (full default config: the built-in task's judge and the reports
    too): a held-out accuracy of >= 0.9, and the policy's own answers judged better than the
    reference's (the whole interval above 0.5). Only its last evaluation is made: evaluating
    changes no training step (generation forks the RNG; test_log_every_averages_over_the_window
    compares runs evaluated at other steps), so its end is the default run's."""
    result, run_dir = train_run(
        ["judge=sort", "logger.report=true", "train.eval_every=null", "eval.generate_every=null"], fast=False
    )
    assert result["eval_rewards/accuracies"] >= 0.9
    assert result["eval_win_rate"] > 0.5 and result["eval_win_rate_low"] > 0.5
    assert result["step"] == 256
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "report.png").is_file() and (run_dir / "report.html").is_file()
    assert (run_dir / "samples" / "step-256.jsonl").is_file()


@pytest.mark.integration
def test_wandb_without_credentials_logs_offline(train_run, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    _, run_dir = train_run(["train.max_steps=2", "logger.wandb.mode=online"])
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1


@pytest.mark.integration
def test_log_every_averages_over_the_window(train_run, short_run, tmp_path):
    # short_run logs every step and evaluates every 2; this run evaluates only at the end, so
    # the rows also show that evaluating changes no training step.
    every = short_run[1]
    _, pairs = train_run([*SHORT, "logger.log_every=2", "train.eval_every=null"], tmp_path / "pairs")
    rows1 = {r["step"]: r for r in read_metrics(every) if "loss" in r}
    rows2 = {r["step"]: r for r in read_metrics(pairs) if "loss" in r}
    assert sorted(rows2) == [2, 4]
    for step in (2, 4):
        for key in ("loss", "rewards/accuracies", "rewards/margins"):
            window = (rows1[step - 1][key] + rows1[step][key]) / 2
            assert abs(rows2[step][key] - window) < 1e-6, (key, step)
        assert rows2[step]["grad_norm"] == rows1[step]["grad_norm"]  # the last step's


@pytest.mark.integration
def test_a_used_run_dir_is_not_overwritten(train_run, short_copy):
    run_dir = short_copy
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="already holds a run"):
        train_run(["train.max_steps=2"], run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.integration
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (["train.max_steps=6"], "n_steps: 4 -> 6"),
        (["optimizer.lr=0.05"], "optimizer.lr: 0.001 -> 0.05"),
        (["data.format.num_train=257"], "data: "),
    ],
    ids=["length", "lr", "data"],
)
def test_resume_refuses_a_changed_run(train_run, short_copy, change, needle):
    with pytest.raises(UserError, match=needle):
        train_run([*SHORT, *change, "train.resume=auto"], short_copy)


@pytest.mark.integration
def test_resume_may_change_where_and_how_often_it_writes(train_run, short_copy):
    run_dir = short_copy
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    train_run(["train.max_steps=4", "train.save_every=1", "train.eval_every=1", "train.resume=auto"], run_dir)
    assert (run_dir / "checkpoints" / "step-3").is_dir()


@pytest.mark.integration
def test_resume_tolerates_a_metrics_line_cut_short(train_run, short_copy):
    run_dir = short_copy
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a crash in the middle of a write
    train_run([*SHORT, "train.resume=auto"], run_dir)
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]


def test_warmup_longer_than_the_run_is_refused_before_loading(train_run):
    # 256 pairs / 8 per step = 32 steps in one epoch, known only once the data is loaded.
    with pytest.raises(ConfigError, match="warmup takes 40 of the run's 32"):
        train_run(["scheduler.warmup_steps=40"])


@pytest.mark.integration
def test_one_step_runs_with_the_default_warmup(train_run):
    result, _ = train_run(["train.max_steps=1"])
    assert result["lr"] > 0  # 10% of one step rounds down to no warmup
