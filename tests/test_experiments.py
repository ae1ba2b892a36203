"""The recipes in conf/experiment/ compose offline, set the values their sources give, say where
those values come from, and validate (all but dpo_paper_hh, which needs the user's SFT model)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from conftest import make_config
from omegaconf import OmegaConf

from dpo_cli import cli
from dpo_cli.config import validate
from dpo_cli.errors import ConfigError

CONF = Path(cli.config_dir())
RECIPES = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SHIPPED = {"dpo_paper_hh", "dpo_paper_hh_sft", "zephyr_dpo", "simpo_llama3_instruct", "smollm2_hh_laptop"}
RM_JUDGE = "dpo_cli.judges.RewardModelJudge"
OA_RM = "OpenAssistant/reward-model-deberta-v3-large-v2"

# The values each recipe takes from its source (see the comment block of each file), and the few
# the recipe chooses itself (smollm2_hh_laptop). Compared with the composed config.
EXPECTED = {
    "dpo_paper_hh": {
        "model.name_or_path": None,  # the user's SFT model: validation asks for it
        "reference.name_or_path": None,  # the initial policy, i.e. that SFT model
        "reference.dtype": "float16",
        "data.format._target_": "dpo_cli.data.formats.hh.HH",
        "data.hub_id": "Anthropic/hh-rlhf",
        "data.max_length": 512,
        "data.max_prompt_length": 256,
        "data.max_eval_pairs": 256,
        "loss._target_": "dpo_cli.losses.DPOLoss",
        "loss.beta": 0.1,
        "optimizer._target_": "torch.optim.RMSprop",
        "optimizer.lr": 1e-6,
        "scheduler.name": "constant_with_warmup",
        "scheduler.warmup_steps": 150,
        "train.batch_size": 64,
        "train.epochs": 1,
        "train.max_grad_norm": 10.0,
        "train.eval_every": 312,
        "eval.prompts": 16,
        "eval.temperature": 1.0,
        "judge._target_": RM_JUDGE,
        "judge.name_or_path": OA_RM,
        "judge.input_format": "pair",
    },
    "dpo_paper_hh_sft": {
        "model.name_or_path": "EleutherAI/pythia-2.8b",
        "data.format._target_": "dpo_cli.data.formats.hh.HH",
        "data.max_length": 512,
        "data.max_prompt_length": 256,
        "loss._target_": "dpo_cli.losses.SFTLoss",
        "optimizer._target_": "torch.optim.RMSprop",
        "optimizer.lr": 5e-7,
        "scheduler.name": "constant_with_warmup",
        "scheduler.warmup_steps": 150,
        "train.batch_size": 64,
        "train.max_grad_norm": 10.0,
        "judge": None,
    },
    "zephyr_dpo": {
        "model.name_or_path": "alignment-handbook/zephyr-7b-sft-full",
        "model.gradient_checkpointing": True,
        "data.format._target_": "dpo_cli.data.formats.ultrafeedback.UltraFeedback",
        "data.hub_id": "HuggingFaceH4/ultrafeedback_binarized",
        "data.train_split": "train_prefs",
        "data.eval_split": "test_prefs",
        "data.max_length": 1024,
        "data.max_prompt_length": 512,
        "loss._target_": "dpo_cli.losses.DPOLoss",
        "loss.beta": 0.01,
        "optimizer._target_": "torch.optim.AdamW",
        "optimizer.lr": 5e-7,
        "scheduler.name": "cosine",
        "scheduler.warmup_ratio": 0.1,
        "train.batch_size": 128,  # 8 per device x 2 accumulation x 8 GPUs
        "train.micro_batch_size": 8,
        "train.epochs": 1,
        "train.mixed_precision": "bf16",
        "train.eval_every": 100,
        "judge": None,
    },
    "simpo_llama3_instruct": {
        "model.name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
        "data.format._target_": "dpo_cli.data.formats.pairs.Pairs",
        "data.hub_id": "princeton-nlp/llama3-ultrafeedback",
        "data.path": None,
        "data.max_length": 2048,
        "data.max_prompt_length": 1800,
        "loss._target_": "dpo_cli.losses.SimPOLoss",
        "loss.beta": 2.5,
        "optimizer._target_": "torch.optim.AdamW",
        "optimizer.lr": 1e-6,
        "scheduler.name": "cosine",
        "scheduler.warmup_ratio": 0.1,
        "train.batch_size": 128,  # 2 per device x 16 accumulation x 4 processes
        "train.micro_batch_size": 2,
        "train.epochs": 1,
        "train.mixed_precision": "bf16",
        "train.eval_every": 400,
        "judge": None,
    },
    "smollm2_hh_laptop": {
        "data.format._target_": "dpo_cli.data.formats.hh.HH",
        "data.max_length": 256,
        "data.max_train_pairs": 128,
        "loss._target_": "dpo_cli.losses.DPOLoss",
        "loss.beta": 0.1,
        "optimizer._target_": "torch.optim.AdamW",
        "train.batch_size": 8,
        "train.mixed_precision": "auto",  # none on the laptop's CPU
        "eval.prompts": 16,
        "eval.max_new_tokens": 64,
        "eval.temperature": 1.0,
        "judge._target_": RM_JUDGE,
        "judge.name_or_path": OA_RM,
        "judge.input_format": "pair",
    },
}


def experiment(name: str) -> list[str]:
    """The override choosing recipe `name`: `experiment=NAME` once conf/config.yaml's defaults
    list has an `experiment` entry, `+experiment=NAME` (append the group) before that."""
    entries = OmegaConf.load(CONF / "config.yaml").defaults
    listed = any(not isinstance(e, str) and "experiment" in e for e in entries)
    return [f"{'' if listed else '+'}experiment={name}"]


@cache
def composed(name: str):
    """The recipe's composed config, once per module: the read-only tests share it."""
    return make_config(experiment(name))


def test_recipes_found():
    assert SHIPPED <= set(RECIPES), RECIPES
    assert set(EXPECTED) == set(RECIPES), "add the new recipe's values to EXPECTED"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_sets_its_source_values(name):
    cfg = composed(name)
    for key, value in EXPECTED[name].items():
        got = OmegaConf.select(cfg, key, throw_on_missing=False)
        if isinstance(value, float):
            assert got == pytest.approx(value), (key, got, value)
        else:
            assert got == value, (key, got, value)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_names_its_source_and_differences(name):
    """Each file is a global delta with its comment block: SOURCE, WHAT DIFFERS, YOU SUPPLY."""
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    header = text.split("\ndefaults:")[0]
    for section in ("# SOURCE", "# WHAT DIFFERS", "# YOU SUPPLY"):
        assert section in header, (name, section)


@pytest.mark.parametrize("name", sorted(set(RECIPES) - {"dpo_paper_hh"}))
def test_recipe_validates(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # validation must not need the hub
    validate(make_config(experiment(name)))


def test_dpo_paper_hh_asks_for_the_sft_model(monkeypatch):
    """The paper's reference is an SFT model the user trains or brings: without one the recipe
    stops at validation with that one problem, and validates once it is given."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        validate(make_config(experiment("dpo_paper_hh")))
    (problem,) = info.value.problems
    assert "model.name_or_path" in problem
    validate(make_config([*experiment("dpo_paper_hh"), "model.name_or_path=runs/sft/final"]))


def test_simpo_gamma_is_beta_times_the_authors_ratio():
    """SimPO's code subtracts gamma_beta_ratio inside beta(...): gamma = beta x 0.55."""
    loss = composed("simpo_llama3_instruct").loss
    assert loss.gamma == pytest.approx(loss.beta * 0.55)


def test_laptop_recipe_is_a_handful_of_steps():
    cfg = composed("smollm2_hh_laptop")
    assert cfg.data.max_train_pairs // cfg.train.batch_size * cfg.train.epochs == 16
    assert cfg.model.name_or_path.endswith(("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"))


@pytest.mark.parametrize("name", ["zephyr_dpo", "simpo_llama3_instruct"])
def test_command_line_wins_over_a_recipe(name, monkeypatch):
    """A group chosen on the command line replaces the recipe's choice and keeps the recipe's
    learning rate; the recipe sets no key that only its own optimizer takes (AdamW's betas would
    be refused by RMSprop), so the result still validates."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_config([*experiment(name), "loss.beta=3.0", "optimizer=rmsprop"])
    assert cfg.loss.beta == 3.0
    assert cfg.optimizer._target_ == "torch.optim.RMSprop"
    assert cfg.optimizer.lr == EXPECTED[name]["optimizer.lr"]
    validate(cfg)
