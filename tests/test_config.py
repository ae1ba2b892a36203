"""Every file in every conf/ group composes and validates; typos and bad values are caught; every
key in every YAML file carries a comment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import yaml_leaves
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_cli import cli
from dpo_cli.config import validate
from dpo_cli.distributed import cpu_only
from dpo_cli.errors import ConfigError

CONF = Path(cli.config_dir())
GROUPS = sorted(d.name for d in CONF.iterdir() if d.is_dir())
GROUP_FILES = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
YAML_FILES = sorted(CONF.rglob("*.yaml"))

# Files that need a value the user must supply (`???`) to compose into a valid config.
REQUIRED = {
    ("model", "pretrained"): ["model.name_or_path=x/y"],
    ("loss", "combo"): ["+loss@loss.terms.dpo=dpo"],  # a combination's terms
    ("data", "kto"): ["data.path=x.jsonl", "loss=kto"],  # unpaired data trains with KTO
    ("data", "pairs"): ["data.path=x.jsonl"],
    ("data", "mix"): ["+data@data.mixture.hh=hh"],
    ("judge", "reward_model"): ["judge.name_or_path=x/rm"],
    ("experiment", "dpo_paper_hh"): ["model.name_or_path=x/y"],
    ("optimizer", "cpu_offload_adamw"): ["train.max_grad_norm=null"],  # gradients leave for the host before clipping
}
# Files this machine refuses, with what the refusal says: CPU offload needs a GPU to offload from.
REFUSED_HERE = {("optimizer", "cpu_offload_adamw"): "nothing to offload"} if cpu_only() else {}


def _default_groups() -> set[str]:
    """Groups named in conf/config.yaml's defaults list (others need `+group=name`)."""
    groups = set()
    for entry in OmegaConf.load(CONF / "config.yaml").defaults:
        if not isinstance(entry, str):
            groups.update(str(k) for k in entry)
    return groups


@pytest.fixture(scope="module")
def compose_cfg():
    """compose(overrides) against the real conf/ with the schema and resolvers registered."""
    cli.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides=(): compose(config_name="config", overrides=list(overrides))


def test_groups_found():
    assert {"model", "data", "loss", "optimizer", "judge"} <= set(GROUPS)
    assert ("model", "tiny") in GROUP_FILES and ("data", "hh") in GROUP_FILES
    # Flags are keys, not groups: scheduler.name, logger.wandb.mode (the old spellings: test_old_spellings_*).
    assert not {"scheduler", "logger"} & set(GROUPS)


@pytest.mark.parametrize("group, name", GROUP_FILES, ids=[f"{g}={n}" for g, n in GROUP_FILES])
def test_every_group_file_composes_and_validates(compose_cfg, group, name):
    prefix = "" if group in _default_groups() else "+"
    overrides = [f"{prefix}{group}={name}", *REQUIRED.get((group, name), [])]
    if group not in ("model", "experiment"):  # an experiment chooses its own model
        # model=tiny (the default) also sets optimizer.lr and train sizes; a pretrained model
        # sets nothing outside model/, so every value of the file under test shows through.
        overrides += ["model=pretrained", *REQUIRED[("model", "pretrained")]]
    cfg = compose_cfg(overrides)
    if (group, name) in REFUSED_HERE:
        with pytest.raises(ConfigError, match=REFUSED_HERE[(group, name)]):
            validate(cfg)
    else:
        validate(cfg)
    # The file's own values are in the composed config, where its package puts them.
    path = CONF / group / f"{name}.yaml"
    global_package = "# @package _global_" in path.read_text()
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    root = "" if global_package else f"{group}."
    for key, value in yaml_leaves(raw):
        if value == "???" or (isinstance(value, str) and value.startswith("${")):  # required, or resolved
            continue
        assert OmegaConf.select(cfg, root + key) == value, (root + key, value)


def test_default_config_validates(compose_cfg):
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.data.format._target_ == "dpo_cli.data.formats.synthetic.Synthetic"
    assert cfg.model.random_init.model_type == "llama"


@pytest.mark.parametrize("override", ["train.bath_size=3", "loss.bta=0.1", "model.nam_or_path=x/y"])
def test_unknown_key_fails_at_compose(compose_cfg, override):
    with pytest.raises((HydraException, OmegaConfBaseException)):
        compose_cfg([override])


@pytest.mark.parametrize("override", ["train.batch_size=abc", "data.max_length=1.5", "model.trust_remote_code=maybe"])
def test_wrong_type_fails_at_compose(compose_cfg, override):
    with pytest.raises((HydraException, OmegaConfBaseException)):
        compose_cfg([override])


def test_validate_collects_every_problem(compose_cfg):
    cfg = compose_cfg(
        [
            "loss.beta=-1",
            "train.batch_size=10",
            "train.micro_batch_size=4",
            "data.max_prompt_length=32",  # data=synthetic has max_length 32
            "optimizer.lr=0",
            "scheduler.name=bogus",
        ]
    )
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    problems = info.value.problems
    expected = {
        "loss": "beta=-1",
        "train.batch_size": "train.batch_size=10",
        "data.max_prompt_length": "data.max_prompt_length=32",
        "optimizer.lr": "optimizer.lr=0",
        "scheduler.name": "scheduler.name='bogus'",
    }
    for key, text in expected.items():
        hits = [p for p in problems if text in p and p.startswith(key.split(".")[0])]
        assert len(hits) == 1, (key, problems)
    assert len(problems) == len(expected), problems
    assert str(len(problems)) in str(info.value)


def test_validate_reports_loss_key_typo(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["+loss.bta=0.1"]))
    (problem,) = info.value.problems
    assert "loss.bta" in problem and "beta" in problem  # names the typo and the allowed keys


def test_loss_wrong_type_fails_at_compose(compose_cfg):
    """The loss's typed schema (/schema/loss/DPOLoss) refuses it before validation."""
    with pytest.raises(HydraException) as info:
        compose_cfg(["loss.beta=abc"])
    assert "loss.beta" in str(info.value.__cause__) and "'abc'" in str(info.value.__cause__)


def test_validate_reports_missing_required_value(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["model=pretrained"]))
    assert any("model.name_or_path" in p for p in info.value.problems)


def test_validate_rejects_two_model_sources(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["model.name_or_path=x/y"]))  # model=tiny also sets random_init
    (problem,) = info.value.problems
    assert "model.name_or_path" in problem and "model.random_init" in problem


# --- every key has a comment ---------------------------------------------------------------------

KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w-]*)\s*:(?P<rest>.*)$")


def uncommented_keys(text: str) -> list[str]:
    """Lines of a YAML file that define a key without a `# comment` on the same line.

    List items, the entries of a Hydra `defaults:` list and the text of a block scalar
    (`header: |-`) are not keys; nested section headers (`train:`) are, and need a comment
    like any other key.
    """
    bad = []
    defaults_indent = None
    block_indent = None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if indent > block_indent:
                continue
            block_indent = None
        if defaults_indent is not None:
            if indent > defaults_indent or stripped.startswith("- "):
                continue
            defaults_indent = None
        if stripped.startswith("- "):
            continue
        m = KEY_LINE.match(line)
        if m is None:
            continue
        if m["key"] == "defaults":
            defaults_indent = indent
            continue
        if not re.search(r"(^|\s)#", m["rest"]):
            bad.append(f"{n}: {line}")
        if re.match(r"\s*[|>][-+]?(\s|$)", m["rest"]):
            block_indent = indent
    return bad


def test_uncommented_keys_detector():
    text = (
        "# header\n"
        "defaults:\n"
        "  - base\n"
        "  - _self_\n"
        "a: 1  # fine\n"
        "b: 2\n"
        "section:\n"
        "  c: x   # fine\n"
        "  d: [1, 2]\n"
        "  e:\n"
        "    - 1\n"
        "  f: |-  # fine\n"
        "    Usage: text, not a key\n"
        "  g: 3\n"
    )
    assert uncommented_keys(text) == ["6: b: 2", "7: section:", "9:   d: [1, 2]", "10:   e:", "14:   g: 3"]


@pytest.mark.parametrize("path", YAML_FILES, ids=[str(p.relative_to(CONF)) for p in YAML_FILES])
def test_every_key_has_a_comment(path):
    assert uncommented_keys(path.read_text()) == []


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["mode=evaluate"], "mode='evaluate' is not one of train"),
        (
            ["model.random_init.model_type=llamaa"],
            "model.random_init.model_type='llamaa' is not a transformers model type",
        ),
        (["+model.random_init.hiden_size=128"], "model.random_init.hiden_size is not a llama config key"),
        (
            ["model.random_init.hidden_size=-1"],
            "model.random_init does not build a transformers config: The hidden size (-1) is not a multiple",
        ),
        (["train.mixed_precision=fp16", "model.dtype=float16"], "train.mixed_precision=fp16 needs "),
        (["model.dtype=float16"], "model.dtype=float16 trains float16 weights without a loss scaler"),
        (["train.max_steps=4", "scheduler.warmup_steps=4"], "scheduler.warmup_steps=4 is not below train.max_steps=4"),
        (["train.save_every=3", "logger.log_every=2"], "train.save_every=3 must be a multiple of logger.log_every=2"),
    ],
    ids=["mode", "model-type", "arch-typo", "arch-invalid", "fp16", "float16-weights", "warmup", "log-window"],
)
def test_validate_rejects_before_weights(compose_cfg, overrides, needle):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(overrides))
    assert any(needle in p for p in info.value.problems), info.value.problems


# --- settings that would be silently ignored ------------------------------------------------------


def test_reference_settings_under_a_reference_free_loss_are_refused_all_named(compose_cfg):
    """reference.dtype was silently ignored: SimPO loads no reference model."""
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["loss=simpo", "reference.dtype=bfloat16", "reference.precompute=true"]))
    (problem,) = [p for p in info.value.problems if p.startswith("reference.")]
    assert problem.startswith("reference.dtype='bfloat16', reference.precompute=True: no term of the loss needs"), (
        problem
    )
    validate(compose_cfg(["loss=dpo", "reference.dtype=bfloat16"]))  # a reference is loaded: it applies


@pytest.mark.parametrize(
    "overrides, key, schema",
    [
        (["~loss.beta"], "loss.beta", "DPOLossOptions"),
        (["loss=dpo_simpo", "~loss.terms.simpo.gamma"], "loss.terms.simpo.gamma", "SimPOLossOptions"),
    ],
)
def test_deleting_a_loss_parameter_is_refused_when_composing(compose_cfg, overrides, key, schema):
    """`~loss.beta` silently trained with the class default; the loss's typed schema
    (/schema/loss/<Class>) holds every parameter and refuses the deletion."""
    with pytest.raises(HydraException) as info:
        compose_cfg(["loss=dpo", *overrides])
    assert f"override ~{key}" in str(info.value), info.value
    assert f"{schema} (DictConfig) does not support deletion" in str(info.value.__cause__), info.value.__cause__


# --- debug=default: the quick run the tests use ---------------------------------------------------


def test_debug_config_wins_over_the_groups_and_loses_to_the_command_line(compose_cfg):
    """debug=default comes last in the defaults list: its values beat data=synthetic's judge=sort
    (and that file's eval.generate_every) and model=tiny's batch sizes; what the command line
    names beats debug's."""
    plain = compose_cfg()
    assert plain.judge is not None and plain.eval.generate_every == 32 and plain.train.batch_size == 64
    cfg = compose_cfg(["debug=default"])
    validate(cfg)
    assert cfg.judge is None and cfg.eval.generate_every is None
    assert (cfg.train.batch_size, cfg.train.micro_batch_size) == (8, 4)
    assert (cfg.data.format.num_train, cfg.data.format.num_eval) == (256, 32)
    assert cfg.model.warm_start.steps == 0
    assert cfg.logger.report is False and cfg.logger.progress is False and cfg.logger.wandb.mode == "disabled"
    asked = compose_cfg(["debug=default", "judge=sort", "logger.report=true", "train.batch_size=16"])
    validate(asked)
    assert asked.judge._target_ == "dpo_cli.judges.SortJudge" and asked.eval.generate_every == 32
    assert asked.logger.report is True and asked.train.batch_size == 16
