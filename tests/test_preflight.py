"""`dpo-train mode=inspect`: the data report and export, without model weights."""

from __future__ import annotations

import json

import pytest
from conftest import QUIET, REPO, data_config, make_config, run_cli
from test_chat import ALTERNATING, a, u
from test_cli import assert_one_clear_error

from dpo_cli.config import validate
from dpo_cli.data.prepare import prepare
from dpo_cli.data.summary import export, report
from dpo_cli.errors import ConfigError, DataError
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


@pytest.mark.integration
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


@pytest.mark.integration
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
    assert proc.returncode == 2, out  # the report, then the refusal: never an OK for a run that would not start
    assert "identical after truncation" in out
    assert "training would refuse this data:" in out
    assert "mode=inspect: training would refuse this run (1 problem):" in out and "Traceback" not in out


@pytest.mark.integration
def test_inspect_of_a_bad_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a", \n')
    proc = run_cli(
        ["dpo-train", "mode=inspect", "data=hh", f"data.path={bad}", *QUIET, f"hydra.run.dir={tmp_path}/r"],
        cwd=tmp_path,
    )
    assert_one_clear_error(proc, "line 2 is not valid JSON")
    assert proc.returncode == 2


@pytest.mark.integration
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
    result, run_dir = train_run(args)  # FAST: no warm start of model=tiny first (not what this tests)
    assert result["step"] == 2 and result["loss"] == result["loss"]  # finite: NaN != NaN
    from transformers import AutoTokenizer

    # The exported tokenizer carries the template the data was rendered with.
    assert AutoTokenizer.from_pretrained(run_dir / "final").chat_template == CHATML

    from conftest import make_config

    from dpo_cli import preflight

    cfg = make_config([*QUIET, *args, "mode=inspect", f"inspect.export={tmp_path}/uf.jsonl"])
    text = preflight.run(validate(cfg))
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
        preflight.run(validate(make_config([*QUIET, *args, "mode=inspect", "data.max_length=2048"])))


# --- inspect.export never overwrites without being asked, and never the input --------------------


def _export_problems(*args: str) -> list[str]:
    try:
        validate(make_config(["mode=inspect", "data=hh", *args]))
    except ConfigError as e:
        return [p for p in e.problems if p.startswith("inspect.export")]
    return []


def test_inspect_export_refuses_an_existing_file_unless_asked(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(HH_SAMPLE.read_text())
    old = tmp_path / "old.jsonl"
    old.write_text("keep me\n")
    args = [f"data.path={data}", f"inspect.export={old}"]
    (problem,) = _export_problems(*args)
    assert problem == f"inspect.export={str(old)!r} already exists; choose another file, or set inspect.overwrite=true"
    assert _export_problems(*args, "inspect.overwrite=true") == []
    assert _export_problems(f"data.path={data}", f"inspect.export={tmp_path}/new.jsonl") == []


def test_inspect_export_never_overwrites_the_input(tmp_path, monkeypatch):
    """The input under another spelling (relative, through a symlink), data.eval_path, and a file
    inside an input directory: refused even with inspect.overwrite=true."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text(HH_SAMPLE.read_text())
    (tmp_path / "link.jsonl").symlink_to(data)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part.jsonl").write_text(HH_SAMPLE.read_text())
    for args, named in (
        ([f"data.path={data}", "inspect.export=d.jsonl"], "data.path"),
        ([f"data.path={data}", "inspect.export=./link.jsonl"], "data.path"),
        ([f"data.path={HH_SAMPLE}", "data.eval_path=d.jsonl", f"inspect.export={data}"], "data.eval_path"),
        ([f"data.path={folder}", f"inspect.export={folder}/part.jsonl"], "data.path"),
        ([f"data.path={folder}", f"inspect.export={folder}/new.jsonl"], "data.path"),
    ):
        (problem,) = _export_problems(*args, "inspect.overwrite=true")
        assert problem.endswith(f"is the input ({named}); write the export to another file"), (args, problem)


@pytest.mark.integration
def test_inspect_export_onto_the_input_leaves_it_unchanged(tmp_path):
    """What a user ran: `data.path=d.jsonl inspect.export=d.jsonl` replaced 12 HH rows with 10 pairs."""
    data = tmp_path / "d.jsonl"
    data.write_text(HH_SAMPLE.read_text())
    before = data.read_bytes()
    proc = run_cli(
        ["dpo-train", "mode=inspect", "data=hh", "data.path=d.jsonl", "inspect.export=d.jsonl", *QUIET], cwd=tmp_path
    )
    assert_one_clear_error(proc, "inspect.export='d.jsonl'", "is the input (data.path)")
    assert proc.returncode == 2
    assert data.read_bytes() == before


def test_export_itself_does_not_replace_a_file_created_meanwhile(tmp_path):
    data = prepare(data_config(format="hh", path=str(HH_SAMPLE), eval_holdout=2), byte_tokenizer(), 0, need_text=True)
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(DataError, match="already exists"):
        export(data, str(out))
    assert out.read_text() == "keep me\n"
    export(data, str(out), overwrite=True)
    assert len(out.read_text().splitlines()) == 10


# --- the report ----------------------------------------------------------------------------------


def test_the_normalized_count_is_the_same_on_a_cache_hit(tmp_path):
    """A conversation the chat template refuses is dropped when rendered, which a cache hit
    skips: '(of N normalized)' counts the pairs before rendering either way."""

    def write(path, rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    rows = [{"prompt": [u(f"q{i}")], "chosen": [a(f"yes {i}")], "rejected": [a(f"no {i}")]} for i in range(6)]
    evals = [
        {"prompt": [u("e")], "chosen": [a("y")], "rejected": [a("n")]},
        {"prompt": [u("e"), u("again")], "chosen": [a("y")], "rejected": [a("n")]},  # roles that do not alternate
    ]
    template = tmp_path / "alternating.jinja"
    template.write_text(ALTERNATING)
    cfg = data_config(
        format="pairs",
        path=write(tmp_path / "train.jsonl", rows),
        eval_path=write(tmp_path / "eval.jsonl", evals),
        chat_template=str(template),
        cache_dir=str(tmp_path / "cache"),
    )
    tok = byte_tokenizer()
    fresh, hit = prepare(cfg, tok, seed=0), prepare(cfg, tok, seed=0)
    assert not fresh.cached and hit.cached
    first_lines = [report(p, tok, 2).splitlines()[0] for p in (fresh, hit)]
    assert first_lines[0] == first_lines[1], first_lines
    assert first_lines[0].endswith("pairs kept: 6 train, 1 eval (of 8 normalized)")


# --- mode=inspect runs the checks training runs before its first step, and exits 2 on any --------

TINY = ["loss=dpo", "train.batch_size=8", "train.micro_batch_size=4", "data.format.num_train=64"]
TINY += ["data.format.num_eval=16", "model.warm_start.steps=0"]
NO_TARGETS = ["model.lora.r=8", "model.lora.target_modules=[nope]"]


def _refusal(overrides: list[str], base: list[str] = TINY) -> str:
    """The message mode=inspect ends with for these overrides (it must refuse them)."""
    import pytest
    from conftest import make_config

    from dpo_cli import preflight
    from dpo_cli.errors import UserError

    with pytest.raises(UserError) as info:
        preflight.run(validate(make_config([*QUIET, *base, "mode=inspect", *overrides])))
    return str(info.value)


@pytest.mark.integration
def test_inspect_lists_every_problem_training_would_refuse_and_exits_2(tmp_path):
    """LoRA target modules the model lacks (peft's error was buried in the memory lines, and
    the exit was 0) and a reward-model judge that cannot be had: the report, then the list."""
    args = ["dpo-train", "mode=inspect", *TINY, *QUIET, *NO_TARGETS, f"hydra.run.dir={tmp_path}/r"]
    args += ["judge=reward_model", f"judge.name_or_path={tmp_path}/no-rm"]
    proc = run_cli(args, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert_one_clear_error(proc, "memory estimate per training process")  # the report is still shown
    assert proc.returncode == 2
    error = out[out.index("[ERROR]") :]
    assert "mode=inspect: training would refuse this run (2 problems):" in error, error
    assert "model.lora.target_modules=['nope']: Target modules {'nope'} not found" in error
    assert "this model's linear layers are: down_proj, gate_proj, k_proj" in error
    assert f"judge.name_or_path='{tmp_path}/no-rm': no such directory" in error


def test_training_refuses_lora_targets_before_any_weights_load(tmp_path, train_run):
    """Before: the model loaded and warm-started (and saved warm_start/) before peft refused."""
    import pytest

    from dpo_cli.errors import ConfigError

    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"model.lora.target_modules=\['nope'\]: Target modules"):
        train_run([*NO_TARGETS, "model.warm_start.steps=2", "train.max_steps=1"], run_dir)
    assert not (run_dir / "warm_start").exists()


def test_inspect_refuses_lora_targets_the_model_lacks():
    msg = _refusal(NO_TARGETS)
    assert "model.lora.target_modules=['nope']" in msg and "(or use all-linear)" in msg
    from conftest import make_config

    from dpo_cli import preflight

    text = preflight.run(validate(make_config([*QUIET, *TINY, "mode=inspect", "model.lora.r=8"])))  # all-linear: fine
    assert "training would refuse" not in text


def test_inspect_refuses_a_reward_model_judge_that_cannot_be_had(tmp_path, monkeypatch):
    """The check training runs before the weights load (evalgen.setup: judge.check, judge.load),
    reading the reward model's config only: missing, offline and not cached, two outputs, no weights."""
    from test_evalgen import save_reward_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    judge = ["judge=reward_model"]
    assert "no such directory" in _refusal([*judge, f"judge.name_or_path={tmp_path}/missing"])
    msg = _refusal([*judge, "judge.name_or_path=nobody/no-reward-model"])
    assert "judge.name_or_path='nobody/no-reward-model'" in msg and "not in the local Hugging Face cache" in msg
    two = save_reward_model(tmp_path / "two", num_labels=2)
    assert f"judge: {str(two)!r} has 2 outputs; a reward model has one (num_labels=1)" in _refusal(
        [*judge, f"judge.name_or_path={two}"]
    )
    weightless = save_reward_model(tmp_path / "weightless")
    for f in weightless.glob("*.safetensors"):
        f.unlink()
    assert "has config.json but no weights" in _refusal([*judge, f"judge.name_or_path={weightless}"])
    good = save_reward_model(tmp_path / "good")
    from conftest import make_config

    from dpo_cli import preflight

    text = preflight.run(validate(make_config([*QUIET, *TINY, "mode=inspect", *judge, f"judge.name_or_path={good}"])))
    assert f"judge reward model {good}" in text and "training would refuse" not in text


def test_training_refuses_a_judge_with_the_preflights_message(tmp_path, train_run):
    import pytest

    from dpo_cli.errors import UserError

    judge = ["judge=reward_model", f"judge.name_or_path={tmp_path}/missing"]
    with pytest.raises(UserError) as info:
        train_run([*judge, "train.max_steps=1"])
    problem = f"judge.name_or_path='{tmp_path}/missing': no such directory"
    assert problem in str(info.value) and problem in _refusal(judge)


def test_inspect_refuses_the_other_checks_training_runs_before_step_1(tmp_path):
    """A warmup longer than the run (train.max_steps unset: known once the data is read), a
    judge without eval prompts, gradient checkpointing a model class lacks, and a separate
    reference whose tokenizer is not the policy's."""
    from test_evalgen import save_reward_model

    assert "warmup takes 20 of the run's 8 optimizer steps" in _refusal(["scheduler.warmup_steps=20"])
    rows = [{"prompt": f"q{i}", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    no_eval = ["data=pairs", f"data.path={data}", "data.eval_holdout=0", "judge=reward_model"]
    no_eval.append(f"judge.name_or_path={save_reward_model(tmp_path / 'rm')}")
    small = ["loss=dpo", "train.batch_size=8", "train.micro_batch_size=4", "model.warm_start.steps=0"]
    assert "judge: the eval split has no prompts to generate responses for" in _refusal(no_eval, small)
    import pytest
    from conftest import make_config

    from dpo_cli import preflight
    from dpo_cli.errors import UserError

    gpt1 = make_config([*QUIET, *TINY, "mode=inspect", "model.gradient_checkpointing=true", "data.max_length=64"])
    gpt1.model.random_init = {"model_type": "openai-gpt", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}
    with pytest.raises(UserError, match="model.gradient_checkpointing=true: OpenAIGPTLMHeadModel does not support"):
        preflight.run(validate(gpt1))
    reference = weightless_model(tmp_path)
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(reference)
    msg = _refusal([f"reference.name_or_path={reference}", "data.max_length=64", "data.max_prompt_length=32"])
    assert "has a different tokenizer from the policy's" in msg
