"""lm-evaluation-harness benchmarks (`eval.harness.*`): lm_eval's numbers on the model in memory
checked against log-likelihoods computed here, the task checks before any weights load, and
`mode=eval` / `eval.harness.at_end` end to end on one short run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, QUIET, REPO, read_metrics, run_cli
from test_cli import assert_one_clear_error

from dpo_cli import harness, hub
from dpo_cli.schema import HarnessConfig, harness_problems

EXAMPLE = REPO / "examples" / "harness"
LOCAL = ["eval.harness.tasks=[sort_choice]", f"eval.harness.include_path={EXAMPLE}", "eval.harness.limit=6"]


def _tiny_model():
    import transformers

    from dpo_cli.modeling.load import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(3)
    return transformers.AutoModelForCausalLM.from_config(config), tokenizer


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) in float64: the prompt's ids (BOS first) are the prefix of the
    whole text's (byte tokens), and each continuation token is scored from the logits before it."""
    ids = tokenizer(context + continuation, return_tensors="pt").input_ids
    n_context = len(tokenizer(context).input_ids)
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logps[i - 1, ids[0, i]]) for i in range(n_context, ids.shape[1]))


def test_lm_eval_scores_the_model_in_memory_as_an_independent_computation(tmp_path):
    model, tokenizer = _tiny_model()
    model.train()  # as the policy is at the end of training: the harness must not leave it in eval mode
    h = HarnessConfig(tasks=["sort_choice"], include_path=str(EXAMPLE), limit=5, batch_size=3)
    metrics = harness.run(model, tokenizer, h, tmp_path / "out", "harness")
    assert model.training
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples_sort_choice.jsonl").read_text().splitlines()]
    assert len(samples) == 5
    model.eval()  # dropout off, as lm_eval scored it
    right = []
    for s in samples:
        doc = s["doc"]
        mine = [_loglikelihood(model, tokenizer, f"sort {doc['digits']}:", f" {c}") for c in doc["choices"]]
        theirs = [value for value, _greedy in s["filtered_resps"]]
        assert theirs == pytest.approx(mine, rel=1e-4, abs=1e-4)
        right.append(float(max(range(len(mine)), key=mine.__getitem__) == doc["label"]))
    assert metrics["harness/sort_choice/acc"] == pytest.approx(sum(right) / len(right))
    assert 0 <= metrics["harness/sort_choice/acc_stderr"] <= 1
    assert set(metrics) == {f"harness/sort_choice/{m}" for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["results"]["sort_choice"]["acc,none"] == metrics["harness/sort_choice/acc"]


def test_flatten_names_metrics_by_task_and_filter():
    results = {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1},
        "arc_easy": {"acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 4, "flag,none": True},
    }
    assert harness.flatten(results, "harness_ref") == {
        "harness_ref/gsm8k/exact_match/strict-match": 0.25,
        "harness_ref/gsm8k/exact_match_stderr/strict-match": 0.1,
        "harness_ref/arc_easy/acc": 0.5,
    }


def test_values_and_modes_are_checked():
    assert harness_problems(HarnessConfig(), "train") == []
    found = harness_problems(HarnessConfig(tasks=["a"], batch_size=0, limit=0, num_fewshot=-1), "train")
    assert len(found) == 4 and "eval.harness.at_end=true" in found[-1]
    assert harness_problems(HarnessConfig(tasks=["a"]), "eval") == []
    assert "needs tasks" in harness_problems(HarnessConfig(reference=True), "eval")[0]


def test_lm_eval_not_installed_is_one_message_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails, as when not installed
    assert harness.task_problems(HarnessConfig(tasks=["sort_choice"])) == [
        "eval.harness.tasks needs EleutherAI's lm-evaluation-harness, which is not installed; "
        "install it with: pip install 'dpo-cli[harness]' (or pip install lm_eval)"
    ]


def _task_dir(tmp_path: Path, name: str, lines: str) -> HarnessConfig:
    directory = tmp_path / name  # a directory per task: harness.task_manager indexes each directory once
    directory.mkdir()
    body = (
        f"task: {name}\n{lines}\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a]\ndoc_to_target: 0\n"
    )
    (directory / f"{name}.yaml").write_text(body)
    return HarnessConfig(tasks=[name], include_path=str(directory))


def test_missing_local_data_and_an_unreachable_hub_dataset_are_refused(tmp_path, monkeypatch):
    h = _task_dir(tmp_path, "mine", "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere/rows.jsonl")
    (problem,) = harness.task_problems(h)
    assert "task mine reads data_files 'nowhere/rows.jsonl', which does not exist" in problem
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    hub.hub_reachable.cache_clear()
    try:
        h = _task_dir(tmp_path, "hubbed", "dataset_path: someone/not-cached-anywhere")
        (problem,) = harness.task_problems(h)
    finally:
        hub.hub_reachable.cache_clear()
    assert "hubbed (someone/not-cached-anywhere) read their dataset from the Hugging Face Hub" in problem
    assert "HF_HUB_OFFLINE is set, with no copy in the datasets cache" in problem
    assert harness.task_problems(HarnessConfig(tasks=["sort_choice"], include_path=str(EXAMPLE))) == []
    bad = HarnessConfig(tasks=["x"], include_path=str(tmp_path / "none"))
    assert "is not a directory" in harness.task_problems(bad)[0]


# --- one short run: eval.harness.at_end in training, then mode=eval on its final/ ----------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """From the command line: mode=eval reads the run's saved config (.hydra/) for its reference."""
    run_dir = tmp_path_factory.mktemp("harness") / "run"
    proc = run_cli(["dpo-train", *QUIET, *FAST, "train.max_steps=2", "train.eval_every=null", *LOCAL,
                    "eval.harness.at_end=true", "eval.harness.reference=true", f"hydra.run.dir={run_dir}"],
                   cwd=run_dir.parent, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir


@pytest.mark.integration
def test_at_end_and_eval_mode_give_the_same_numbers_through_the_cli(finished, tmp_path):
    last = read_metrics(finished)[-1]
    assert last["step"] == 2 and 0 <= last["harness/sort_choice/acc"] <= 1
    assert 0 <= last["harness_ref/sort_choice/acc"] <= 1
    assert (finished / "harness" / "policy" / "results.json").is_file()
    assert (finished / "harness" / "reference" / "samples_sort_choice.jsonl").is_file()
    out = tmp_path / "eval"
    proc = run_cli(["dpo-train", "mode=eval", *QUIET, *FAST, f"model.name_or_path={finished / 'final'}",
                    *LOCAL, "eval.harness.reference=true", f"hydra.run.dir={out}"], cwd=tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "benchmarks                 sort_choice acc" in proc.stdout + proc.stderr  # the summary
    record = json.loads((out / "eval.json").read_text())
    (row,) = read_metrics(out)
    assert row["step"] == 0 and record["metrics"] == {k: v for k, v in row.items() if k != "step"}
    # final/ reloaded, and the reference rebuilt from the run's seed: the numbers of the run's end.
    for key, value in last.items():
        if key.startswith(("harness/", "harness_ref/")):
            assert row[key] == pytest.approx(value, abs=1e-6), key
    samples = (out / "harness" / "policy" / "samples_sort_choice.jsonl").read_text().splitlines()
    assert len(samples) == 6


@pytest.mark.integration
def test_an_unknown_task_is_refused_before_any_weights_load(tmp_path):
    """Refused by the config check before Hydra starts: the model (here none) is never looked at."""
    out = tmp_path / "eval"
    proc = run_cli(["dpo-train", "mode=eval", *QUIET, f"model.name_or_path={tmp_path / 'run' / 'final'}",
                    "eval.harness.tasks=[sort_choise]", f"eval.harness.include_path={EXAMPLE}", f"hydra.run.dir={out}"],
                   cwd=tmp_path)  # fmt: skip
    assert_one_clear_error(
        proc, "eval.harness.tasks: sort_choise is no task", "did you mean sort_choice", "lm-eval ls tasks"
    )
    assert proc.returncode == 2 and not out.exists()


def test_the_report_and_the_summary_show_the_last_benchmarks(tmp_path):
    from dpo_cli.recap import harness_line
    from dpo_cli.report import harness_rows, render_html

    rows = [
        {"step": 2, "eval_loss": 0.5},
        {"step": 2, "harness/t/acc": 0.5, "harness/t/acc_stderr": 0.1, "harness_ref/t/acc": 0.25, "harness/u/f1": 0.75},
    ]
    assert harness_rows(rows) == [("t/acc", 0.5, 0.25), ("u/f1", 0.75, None)]
    page = render_html(tmp_path, rows, b"")
    assert "<caption>benchmarks (lm-evaluation-harness)</caption>" in page
    assert '<tr><th>t/acc</th><td class="num">0.5</td><td class="num">0.25</td></tr>' in page
    assert harness_line(rows[1]) == "t acc 0.500 (reference 0.250) | u f1 0.750"
    assert harness_rows(rows[:1]) == [] and harness_line(rows[0]) is None


def test_a_reference_the_run_will_not_hold_at_its_end_is_refused_before_anything_loads():
    from conftest import make_config

    from dpo_cli import config
    from dpo_cli.errors import ConfigError

    args = ["eval.harness.tasks=[sort_choice]", "eval.harness.at_end=true", "eval.harness.reference=true"]
    with pytest.raises(ConfigError) as e:
        config.validate(make_config([*args, "loss=simpo"]), quiet=True)
    (problem,) = e.value.problems
    assert "this run keeps none (no loss term needs a reference); set eval.harness.reference=false" in problem
    # Under LoRA the run holds the adapter switched off as its reference when its loss needs one;
    # with a reference-free loss it holds none (the benchmarks used to fail after training).
    with pytest.raises(ConfigError, match="no loss term needs a reference"):
        config.validate(make_config([*args, "loss=simpo", "model.lora.r=4"]), quiet=True)
    lora = make_config([*args, "loss=dpo", "model.lora.r=4", f"eval.harness.include_path={EXAMPLE}"])
    assert config.validate(lora, quiet=True).eval.harness.tasks == ["sort_choice"]
