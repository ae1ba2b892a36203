"""Where a model comes from: local directories (and what is wrong with them), hub ids offline,
the smollm2 location, and `dpo-train model.name_or_path=DIR` without `model=`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import FAST, QUIET, make_config, read_metrics, run_cli
from hydra.utils import instantiate
from test_architectures import save_tiny_model
from test_cli import assert_one_clear_error

from dpo_cli import checkpoint, cli, memory, preflight
from dpo_cli.config import validate
from dpo_cli.errors import ConfigError, ModelLoadError
from dpo_cli.hub import hub_reachable, looks_like_path
from dpo_cli.modeling import byte_tokenizer, check_max_length, load_model, load_tokenizer

SMOLLM2_DIR = "models/smollm2-135m-instruct"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHORT = ["train.max_steps=2", "logger.log_every=1", "data.format.num_train=32", "data.format.num_eval=4"]


def exit_2(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_clear_error(proc, *needles)


# --- local path or hub id ------------------------------------------------------------------------


def test_org_name_is_a_path_when_its_first_component_is_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("models/some-model")
    (tmp_path / "models").mkdir()
    assert looks_like_path("models/some-model")  # not there yet: "no such directory", not a hub lookup
    assert not looks_like_path("meta-llama/Llama-3.2-1B-Instruct")
    assert looks_like_path(SMOLLM2_DIR) and looks_like_path("./x") and looks_like_path("a/b/c")


@pytest.mark.integration
def test_smollm2_location_before_it_is_fetched_says_to_run_make_smollm2(tmp_path):
    proc = run_cli(
        ["dpo-train", "model=smollm2", f"model.name_or_path={SMOLLM2_DIR}", f"hydra.run.dir={tmp_path}/r"],
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1"},
    )
    exit_2(proc, f"model.name_or_path='{SMOLLM2_DIR}': no such directory", "run `make smollm2")
    assert "hf download" not in proc.stdout + proc.stderr


def test_uncached_hub_id_offline_names_both_readings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()  # remembers its answer for the process
    try:
        with pytest.raises(ModelLoadError) as info:
            check_max_length(make_config(["model=pretrained", "model.name_or_path=some-org/some-model"]).model, 32)
    finally:
        hub_reachable.cache_clear()
    message = str(info.value)
    assert "there is no local directory 'some-org/some-model'" in message
    assert (  # offline mode is on: the Hub is not asked, and setting HF_HUB_OFFLINE is not suggested
        "hub id 'some-org/some-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so the Hub "
        "is not asked" in message
    )
    assert "model.name_or_path=DIR" in message


# --- what is wrong with a local model directory ------------------------------------------------------


def _problems(overrides: list[str]) -> list[str]:
    """What the model checks that read files (before data and weights) say."""
    with pytest.raises(ConfigError) as info:
        check_max_length(make_config(overrides).model, 32)
    return info.value.problems


def test_empty_directory_says_it_is_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    (problem,) = _problems(["model=pretrained", f"model.name_or_path={tmp_path / 'empty'}"])
    assert problem == f"model.name_or_path='{tmp_path / 'empty'}': directory {tmp_path / 'empty'} is empty; " + (
        "point model.name_or_path at a model directory"
    )


def test_directory_without_config_json_lists_what_it_holds(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path / "tok")
    (problem,) = _problems(["model=pretrained", f"model.name_or_path={tmp_path / 'tok'}"])
    assert f"{tmp_path / 'tok'} has no config.json (it holds: tokenizer.json, tokenizer_config.json)" in problem
    assert "Expecting value" not in problem


def test_model_directory_without_tokenizer_files_says_so(tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama")
    for f in model_dir.glob("tokenizer*"):
        f.unlink()
    (problem,) = _problems(["model=pretrained", f"model.name_or_path={model_dir}"])
    assert f"{model_dir} has no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model, ..." in problem
    assert "set model.tokenizer" in problem and "sentencepiece" not in problem


def test_unreadable_config_json_and_missing_tokenizer_directory_are_reported_together(tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama")
    (model_dir / "config.json").write_text("")
    problems = _problems(
        ["model=pretrained", f"model.name_or_path={model_dir}", f"model.tokenizer={tmp_path / 'no-tokenizer'}"]
    )
    assert len(problems) == 2
    assert "config.json is not valid JSON (Expecting value" in problems[0]
    assert problems[1].startswith(f"model.tokenizer='{tmp_path / 'no-tokenizer'}': no such directory")


def test_gguf_file_missing_from_the_directory(tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama")
    (problem,) = _problems(["model=pretrained", f"model.name_or_path={model_dir}", "model.gguf_file=m.gguf"])
    assert f"{model_dir} has no m.gguf (it holds: config.json, generation_config.json, model.safetensors" in problem


@pytest.mark.integration
def test_directory_without_weights_exits_2_before_loading(tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama")
    (model_dir / "model.safetensors").unlink()
    proc = run_cli(
        ["dpo-train", *QUIET, *FAST, *SHORT, "model=pretrained", f"model.name_or_path={model_dir}"]
        + [f"hydra.run.dir={tmp_path}/r"],
        cwd=tmp_path,
    )
    exit_2(proc, f"{model_dir} has config.json but no weights (*.safetensors or *.bin)")


# --- dpo-train model.name_or_path=DIR, without model= --------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["model.name_or_path=d"], ["model.name_or_path=d", "model=pretrained"]),
        (["-m", "x=1", "model.name_or_path=d", "--cfg", "job"], ["-m", "x=1", "model.name_or_path=d", "model=pretrained", "--cfg", "job"]),
        (["++model.name_or_path=d"], ["++model.name_or_path=d", "model=pretrained"]),
        (["model=tiny", "model.name_or_path=d"], None),  # an explicit choice stays: validate says what to do
        (["model=qwen", "model.name_or_path=d"], None),
        (["+model@reference=pretrained", "model.name_or_path=d"], None),
        (["model.name_or_path=null"], None),
        (["model.dtype=bfloat16"], None),
    ],
)  # fmt: skip
def test_name_or_path_without_a_model_choice_adds_model_pretrained(args, expected):
    assert cli.pretrained_by_default(["dpo-train", *args]) == ["dpo-train", *(expected or args)]


def test_model_tiny_with_name_or_path_says_to_use_model_pretrained():
    with pytest.raises(ConfigError) as info:
        validate(make_config(["model=tiny", "model.name_or_path=some/dir"]))
    (problem,) = info.value.problems
    assert "use model=pretrained model.name_or_path=some/dir" in problem


@pytest.mark.integration
def test_dpo_train_with_only_name_or_path_trains_that_model_with_pretrained_settings(tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama")
    run_dir = tmp_path / "r"
    proc = run_cli(
        ["dpo-train", f"model.name_or_path={model_dir}", *QUIET, *FAST, *SHORT, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "model.name_or_path given without model=: using model=pretrained" in proc.stdout + proc.stderr
    composed = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert composed["optimizer"]["lr"] == 5e-7 and composed["model"]["random_init"] is None
    assert composed["model"]["name_or_path"] == str(model_dir)
    assert abs(read_metrics(run_dir)[0]["loss"] - math.log(2)) < 1e-6


@pytest.mark.integration
def test_multirun_with_only_name_or_path_uses_model_pretrained_in_every_job(tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama")
    proc = run_cli(
        ["dpo-train", "-m", f"model.name_or_path={model_dir}", "train.seed=1,2", *QUIET]
        + [*FAST, "train.max_steps=1", "train.eval_every=null", "judge=none", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for job in ("0", "1"):  # a training job each (mode=inspect writes no run directory to read back)
        composed = yaml.safe_load((tmp_path / "sweep" / job / ".hydra" / "config.yaml").read_text())
        assert composed["model"]["random_init"] is None and composed["optimizer"]["lr"] == 5e-7


# --- model=smollm2: the local copy when there is one ----------------------------------------------


def test_local_or_hub_prefers_the_current_directory_then_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.local_or_hub("models/not-there", "org/name") == "org/name"
    (tmp_path / "models" / "not-there").mkdir(parents=True)
    assert cli.local_or_hub("models/not-there", "org/name") == str(tmp_path / "models" / "not-there")
    # Not in the current directory, but in the repository root (where `make smollm2` writes).
    assert cli.local_or_hub("conf/model", "org/name") == str(Path(cli.config_dir()).resolve() / "model")


def test_model_smollm2_uses_the_local_copy_when_there_is_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = make_config(["model=smollm2"]).model.name_or_path
    # This checkout may hold the fetched copy (found from the repository root), or not.
    assert name == SMOLLM2_HUB or name.endswith(SMOLLM2_DIR)
    (tmp_path / SMOLLM2_DIR).mkdir(parents=True)
    assert make_config(["model=smollm2"]).model.name_or_path == str(tmp_path / SMOLLM2_DIR)


# --- the attention back-end: the best the model supports unless asked ----------------------------


@pytest.mark.integration
def test_gemma2_from_a_directory_trains_with_default_settings_and_an_explicit_sdpa_is_refused(tmp_path):
    """Gemma-2 has no sdpa (it soft-caps attention logits). With default settings
    (model.attn_implementation=null) it runs eager, says so, and trains; an explicit sdpa is
    still a clear refusal, before any weights load, naming fixes that work (tried here)."""
    model_dir = save_tiny_model(tmp_path / "gemma2", "gemma2")
    base = ["dpo-train", f"model.name_or_path={model_dir}", *QUIET, *FAST, *SHORT]
    proc = run_cli([*base, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "attention: eager (model.attn_implementation=null: the best Gemma2ForCausalLM supports)" in proc.stdout
    assert abs(read_metrics(tmp_path / "r")[0]["loss"] - math.log(2)) < 1e-6
    proc = run_cli([*base, "model.attn_implementation=sdpa", f"hydra.run.dir={tmp_path}/s"], cwd=tmp_path)
    exit_2(
        proc,
        "model.attn_implementation=sdpa: Gemma2ForCausalLM does not support it; set model.attn_implementation=eager, "
        "or null (the default: the best the model supports, here eager)",
    )
    for fix in ("eager", "null"):
        check_max_length(
            make_config(
                ["model=pretrained", f"model.name_or_path={model_dir}", f"model.attn_implementation={fix}"]
            ).model,
            32,
        )


def test_the_default_attention_is_the_best_each_model_supports_everywhere(tmp_path):
    """null resolves to sdpa for Llama and eager for Gemma-2, the same in training (the loaded
    model), in mode=inspect's layout line and in its memory estimate (eager stores the scores)."""
    for arch, expected in (("llama", "sdpa"), ("gemma2", "eager")):
        model_dir = save_tiny_model(tmp_path / arch, arch)
        cfg = make_config(["model=pretrained", f"model.name_or_path={model_dir}", *FAST])
        assert cfg.model.attn_implementation is None
        tokenizer = load_tokenizer(cfg.model)
        assert load_model(cfg.model, tokenizer, 0).config._attn_implementation == expected
        assert f"back-end {expected}" in preflight.batches(cfg, tokenizer)
        activations = memory.estimate(cfg, tokenizer, instantiate(cfg.loss)).report()
        assert ("5*a*T/h" in activations) == (expected == "eager"), activations


def test_a_checkpoint_written_with_the_former_sdpa_default_resumes_under_null(tmp_path):
    """Runs checkpointed when sdpa was the default resume under the new default: the attention
    kernel changes rounding, not what is computed (as train.layout)."""
    cfg = validate(make_config(["model.attn_implementation=null"]))  # the default now
    (tmp_path / checkpoint.STATE_FILE).write_text(
        json.dumps({**checkpoint.settings(cfg), "model.attn_implementation": "sdpa"})
    )
    checkpoint.check_compatible(tmp_path, checkpoint.settings(cfg))
