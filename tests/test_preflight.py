"""`dpo-train mode=inspect`: the data report and export, without model weights."""

from __future__ import annotations

import json

from conftest import QUIET, REPO, run_cli
from test_cli import assert_one_clear_error

from dpo_cli.modeling import byte_tokenizer

HH_SAMPLE = REPO / "tests" / "fixtures" / "hh_sample.jsonl"


def weightless_model(tmp_path):
    """A model directory with a tokenizer and a config but no weights: inspect must not need them."""
    from transformers import LlamaConfig

    model_dir = tmp_path / "model"
    tok = byte_tokenizer()
    tok.save_pretrained(model_dir)
    LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=1024).save_pretrained(model_dir)  # fmt: skip
    assert not list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin"))
    return model_dir


def test_inspect_reports_and_exports_without_weights(tmp_path):
    model_dir = weightless_model(tmp_path)
    export = tmp_path / "pairs.jsonl"
    args = [
        "dpo-train",
        "mode=inspect",
        "model=pretrained",
        f"model.name_or_path={model_dir}",
        "data=hh",
        f"data.path={HH_SAMPLE}",
        "data.eval_holdout=2",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        f"inspect.export={export}",
        *QUIET,
        f"hydra.run.dir={tmp_path}/r",
    ]
    proc = run_cli(args, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # 12 rows: 2 dropped when reading (one per reason), 10 pairs: 8 train + 2 held out.
    assert "rows read: train 12; pairs kept: 8 train, 2 eval" in out
    assert "'empty response': 1" in out and "'dialogues differ before the last assistant turn': 1" in out
    for line in ("prompt tokens: p50=", "chosen tokens: p50=", "rejected tokens: p50=", "truncated: prompts 0"):
        assert line in out, line
    assert "optimizer steps of 4 pairs" in out
    assert "batches: layout shared, chunked LM head on scored positions (1024 per chunk): sdpa attention" in out
    assert out.count("[prompt]<s>\n\nHuman:") == 3 and "[/chosen]" in out and "[/rejected]" in out
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(rows) == 10 and {r["split"] for r in rows} == {"train", "eval"}
    for r in rows:
        assert all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected"))
        assert r["prompt"].endswith("\n\nAssistant:")
    # The same data with mode=train fails: there are no weights to load.
    proc = run_cli([a for a in args if a != "mode=inspect" and not a.startswith("inspect.")], cwd=tmp_path)
    assert proc.returncode != 0


def test_inspect_reports_data_training_would_refuse(tmp_path):
    proc = run_cli(
        [
            "dpo-train",
            "mode=inspect",
            "data.max_length=5",
            "data.max_prompt_length=4",
            *QUIET,
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "identical after truncation" in out
    assert "training would refuse this data:" in out


def test_inspect_of_a_bad_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a", \n')
    proc = run_cli(
        ["dpo-train", "mode=inspect", "data=hh", f"data.path={bad}", *QUIET, f"hydra.run.dir={tmp_path}/r"],
        cwd=tmp_path,
    )
    assert_one_clear_error(proc, "line 2 is not valid JSON")
    assert proc.returncode == 2


def test_ultrafeedback_trains_with_a_chat_template_file_and_exports_the_templated_text(tmp_path, train_run):
    from test_chat import CHATML

    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    fixture = REPO / "tests" / "fixtures" / "ultrafeedback_sample.jsonl"
    args = [
        "data=ultrafeedback",
        f"data.path={fixture}",
        f"data.chat_template={template}",
        "data.eval_holdout=2",
        "data.cache_dir=null",
        "train.batch_size=2",
        "train.micro_batch_size=2",
        "train.max_steps=2",
    ]
    result, run_dir = train_run(args, fast=False)
    assert result["step"] == 2 and result["loss"] == result["loss"]  # finite: NaN != NaN
    from transformers import AutoTokenizer

    # The exported tokenizer carries the template the data was rendered with.
    assert AutoTokenizer.from_pretrained(run_dir / "final").chat_template == CHATML

    from conftest import make_config

    from dpo_cli import preflight

    cfg = make_config([*QUIET, *args, "mode=inspect", f"inspect.export={tmp_path}/uf.jsonl"])
    text = preflight.run(cfg)
    assert "[prompt]<s><|im_start|>" in text and "<|im_start|>assistant\n[/prompt]" in text
    rows = [json.loads(line) for line in (tmp_path / "uf.jsonl").read_text().splitlines()]
    assert rows and all(r["prompt"].endswith("<|im_start|>assistant\n") and "templated" not in r for r in rows)


def test_max_length_beyond_a_pretrained_models_positions_is_refused_from_its_config(tmp_path):
    """Only config.json is read: the model directory has no weights at all."""
    import pytest
    from conftest import make_config

    from dpo_cli import preflight
    from dpo_cli.errors import ConfigError

    model_dir = weightless_model(tmp_path)  # max_position_embeddings=1024
    args = ["model=pretrained", f"model.name_or_path={model_dir}", "data=hh", f"data.path={HH_SAMPLE}"]
    with pytest.raises(ConfigError, match=r"data.max_length=2048 is longer than the model's 1024 positions"):
        preflight.run(make_config([*QUIET, *args, "mode=inspect", "data.max_length=2048"]))
