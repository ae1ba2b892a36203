"""The config is typed end to end: composed once, converted to the schema's objects once
(`config.validate`), and read by attribute below the entry point; the YAML files hold only what
differs from the schema's defaults; earlier spellings still work on the command line."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from conftest import make_config, yaml_leaves
from omegaconf import OmegaConf

from dpo_cli import cli, options
from dpo_cli.config import validate
from dpo_cli.schema import Config, LoggerConfig, TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_cli"
CONF = PACKAGE.parent / "conf"
# The entry point and what reads the config before it is typed: the command line, the composed
# config's validation and its unknown keys, a run's recorded config file.
UNTYPED = {"cli.py", "overrides.py", "config.py", "keys.py", "recorded.py"}
CONFIG_NAMES = {"cfg", "config_section", "data", "section", "settings", "lora", "t", "m", "r", "e", "lg", "s", "d"}


def _config_parameters_typed_loosely() -> list[str]:
    """Parameters below the entry point annotated DictConfig, or named like a config section and annotated Any."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in UNTYPED and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for arg in [*fn.args.args, *fn.args.kwonlyargs]:
                note = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if "DictConfig" in note or (arg.arg in CONFIG_NAMES and note == "Any"):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{fn.lineno} {fn.name}({arg.arg}: {note})")
    return found


def test_no_untyped_config_parameters_below_the_entry_point():
    assert _config_parameters_typed_loosely() == []


def test_validate_returns_the_schema_objects():
    cfg = validate(make_config(["debug=default"]))
    assert isinstance(cfg, Config) and isinstance(cfg.train, TrainConfig) and isinstance(cfg.logger, LoggerConfig)
    # `_target_` nodes are their target's generated options, with every parameter of its signature.
    assert type(cfg.optimizer).__name__ == "AdamWOptions" and cfg.optimizer.amsgrad is False
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.weight_decay == 0.0  # model=tiny's and adamw.yaml's values


def test_an_optimizer_without_a_conf_file_is_checked_against_its_signature():
    with pytest.raises(Exception) as info:
        validate(make_config(["optimizer._target_=torch.optim.SGD", "+optimizer.nesterv=true"]))
    assert "optimizer.nesterv is not a parameter of torch.optim.SGD" in str(info.value)


@pytest.mark.parametrize(
    "old, key, value",
    [
        ("scheduler=linear", "scheduler.name", "linear"),
        ("scheduler=constant", "scheduler.name", "constant_with_warmup"),  # what the old group's file set
        ("scheduler=cosine,linear", "scheduler.name", "cosine,linear"),
        ("logger=local", "logger.wandb.mode", "disabled"),
    ],
)
def test_old_spellings_of_the_flag_groups_still_work(old, key, value):
    assert cli.old_spellings(["dpo-train", old]) == ["dpo-train", f"{key}={value}"]
    if "," not in old:  # a sweep's choices compose one by one
        assert OmegaConf.select(make_config([old]), key) == value


def _schema_default(node_type, key):
    """The default of dotted `key` in dataclass `node_type`, or a sentinel."""
    for part in key.split("."):
        if not dataclasses.is_dataclass(node_type):
            return "<none>"
        found = {f.name: f for f in dataclasses.fields(node_type)}.get(part)
        if found is None:
            return "<none>"
        value = found.default if found.default is not dataclasses.MISSING else found.default_factory()
        node_type = value if dataclasses.is_dataclass(value) else value
    return node_type


@pytest.mark.parametrize(
    "path", ["conf/config.yaml", *(f"conf/model/{p.name}" for p in sorted((CONF / "model").glob("*.yaml")))]
)
def test_root_and_model_files_hold_only_values_that_differ_from_the_schema(path):
    raw = OmegaConf.to_container(OmegaConf.load(PACKAGE.parent / path), resolve=False)
    global_package = "# @package _global_" in (PACKAGE.parent / path).read_text()
    root = "" if global_package or path == "conf/config.yaml" else "model."
    same = [k for k, v in yaml_leaves(raw) if not k.startswith("hydra.") and _schema_default(Config, root + k) == v]
    assert same == []


@pytest.mark.parametrize("group, target", [("optimizer", "adamw"), ("optimizer", "rmsprop"), ("judge", "reward_model")])
def test_option_files_hold_only_values_that_differ_from_the_signature(group, target):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{target}.yaml"), resolve=False)
    schema_name = raw["defaults"][0].split("/")[-1].split("@")[0]
    node = options.options_of(
        {"AdamW": "torch.optim.AdamW", "RMSprop": "torch.optim.RMSprop"}.get(
            schema_name, f"dpo_cli.judges.{schema_name}"
        )
    )
    same = [k for k, v in yaml_leaves(raw) if v != "???" and _schema_default(node, k) == v]
    assert same == []


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_files_hold_only_what_differs_from_their_groups(name):
    """An experiment is a delta: each value it sets differs from what its group choices alone give."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"), resolve=False)
    groups = [
        f"{k.removeprefix('override /')}={v}" for d in raw["defaults"] if isinstance(d, dict) for k, v in d.items()
    ]
    required = ["model.name_or_path=x/y"] if "model=pretrained" in groups else []
    required += ["judge.name_or_path=x/rm"] if "judge=reward_model" in groups else []
    base = make_config(groups + required)
    same = []
    for key, value in yaml_leaves(raw):
        have = OmegaConf.select(base, key, default="<absent>")
        have = OmegaConf.to_container(have) if OmegaConf.is_config(have) else have
        if value != "???" and have == value:
            same.append(key)
    assert same == []


def test_a_recipe_under_debug_runs_without_its_judge(caplog):
    """`experiment=X debug=default` failed: debug chose judge=none after the recipe set judge.* keys,
    leaving a judge mapping without a `_target_`. Now the run has no judge, and a warning names the keys."""
    cfg = validate(make_config(["experiment=smollm2_hh_laptop", "debug=default"]))
    assert cfg.judge is None
    assert "judge.name_or_path" in caplog.text and "no judge is chosen" in caplog.text


def test_a_target_changed_on_a_typed_node_is_checked_against_the_new_class_once():
    """`loss._target_=...IPOLoss` on DPO's typed node: the keys IPO does not take are named, each once."""
    with pytest.raises(Exception) as info:
        validate(make_config(["loss._target_=dpo_cli.losses.IPOLoss", "+loss.foo=1"]))
    problems = info.value.problems
    assert len(problems) == len(set(problems)) == 3, problems
    assert all("is not a parameter of dpo_cli.losses.IPOLoss" in p for p in problems)


def test_mixed_precision_auto_is_bf16_on_a_gpu_with_bf16_and_none_elsewhere(monkeypatch, caplog):
    """train.mixed_precision=auto (the default) is resolved when the config is validated, so the
    typed config (what a run records and a resume compares) holds what runs: none on this CPU,
    bf16 where CUDA has it, none on a GPU without bf16; an explicit value is kept."""
    import torch

    assert make_config([]).train.mixed_precision == "auto"
    with caplog.at_level("INFO", logger="dpo_cli.config"):
        assert validate(make_config([])).train.mixed_precision == "no"
    assert "train.mixed_precision=auto: no (no CUDA GPU with bf16)" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert validate(make_config([]), quiet=True).train.mixed_precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100, a T4
    assert validate(make_config([]), quiet=True).train.mixed_precision == "no"
    assert validate(make_config(["train.mixed_precision=no"]), quiet=True).train.mixed_precision == "no"
