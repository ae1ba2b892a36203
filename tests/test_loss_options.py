"""The losses' typed config (dpo_cli.losses.options): one schema per loss class with its
modifiers' keys, conf/loss files that hold only what differs from it, compose-time refusals,
and `loss_problems` / `build_loss` on the typed node."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import QUIET, REPO, make_config
from hydra.errors import HydraException
from omegaconf import OmegaConf

from dpo_cli.losses import Combination, DPOLoss, Loss
from dpo_cli.losses.modifiers import FDivergence, LengthDesensitized, PairWeights
from dpo_cli.losses.options import build_loss, loss_classes, loss_problems, register_schemas

LOSS_FILES = sorted((REPO / "conf" / "loss").glob("*.yaml"))
KTO_FIXTURE = REPO / "tests" / "fixtures" / "kto_sample.jsonl"


def typed(overrides: list[str]):
    """The composed loss node as `OmegaConf.to_object` gives it: an options object."""
    return OmegaConf.to_object(make_config(QUIET + overrides).loss)


def test_every_loss_class_has_a_schema_with_its_modifiers_keys():
    """One schema per exported loss class, its constructor's parameters plus the keys of every
    modifier it accepts, with the class's (and modifier's) defaults."""
    schemas = register_schemas()
    classes = loss_classes()
    assert len(classes) == 24 and Combination in classes and Loss not in classes
    assert set(schemas) == {c.__name__ for c in classes}
    for cls in classes:
        fields = {f.name: f.default for f in dataclasses.fields(schemas[cls.__name__])}
        assert fields["_target_"] == f"dpo_cli.losses.{cls.__name__}"
        for modifier in (LengthDesensitized, PairWeights, FDivergence):
            for key in modifier.keys():
                assert (key in fields) == (modifier in cls.accepts), (cls, key)
    dpo = {f.name: f.default for f in dataclasses.fields(schemas["DPOLoss"])}
    assert dpo == {
        "_target_": "dpo_cli.losses.DPOLoss",
        "beta": 0.1,
        "label_smoothing": 0.0,
        "nll_weight": 0.0,
        "ld_alpha": None,
        "wpo": False,
        "f_divergence": "reverse_kl",
        "f_alpha": 0.5,
    }


def _defaults_of(path: Path) -> tuple[str | None, dict]:
    """The schema a conf/loss file extends (by its defaults list) and the keys it sets itself."""
    data = yaml.safe_load(path.read_text()) or {}
    schema = next((d.split("@")[0].rpartition("/")[2] for d in data.get("defaults", []) if isinstance(d, str)
                   and d.startswith("/schema/loss/")), None)  # fmt: skip
    return schema, {k: v for k, v in data.items() if k != "defaults"}


@pytest.mark.parametrize("path", LOSS_FILES, ids=lambda p: p.stem)
def test_loss_files_compose_typed_and_hold_no_key_equal_to_its_default(path):
    """Each conf/loss file composes into its class's options object (terms included) and sets
    only keys whose value differs from the schema's default (the rest is the schema's)."""
    extra = ["+loss@loss.terms.dpo=dpo"] if path.stem == "combo" else []
    node = typed([f"loss={path.stem}", *extra])
    assert type(node).__name__.endswith("Options"), type(node)
    for term in getattr(node, "terms", {}).values():
        assert type(term).__name__.endswith("Options"), type(term)
    schema, own = _defaults_of(path)
    if schema is None:  # rpo.yaml extends dpo.yaml
        assert path.stem == "rpo"
        schema = "DPOLoss"
    defaults = {f.name: f.default for f in dataclasses.fields(register_schemas()[schema])}
    for key, value in own.items():
        assert key in defaults, (path.name, key)
        assert value != defaults[key] or type(value) is not type(defaults[key]), (path.name, key, value)
    problems, terms = loss_problems(node, unpaired=False, micro_batch_size=2)
    assert problems == [] and all(isinstance(t, Loss) for t in terms.values()), problems


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["loss.bta=1"], "Key 'bta' not in 'DPOLossOptions'"),
        (["loss.beta=abc"], "could not be converted to Float"),
        (["loss.ld_alpha=abc"], "could not be converted to Float"),
        (["loss=aot", "loss.wpo=true"], "Key 'wpo' not in 'AOTLossOptions'"),
        (["loss=simpo", "loss.ld_alpha=0.5"], "Key 'ld_alpha' not in 'SimPOLossOptions'"),
        (["loss=nca_pair", "loss.f_divergence=forward_kl"], "Key 'f_divergence' not in 'NCAPairLossOptions'"),
        (["loss=mpo", "loss.terms.bco_pair.f_alpha=0.3"], "Key 'f_alpha' not in 'BCOPairLossOptions'"),
    ],
)
def test_typos_wrong_types_and_unaccepted_modifier_keys_fail_at_compose_time(overrides, needle):
    with pytest.raises(HydraException) as info:
        make_config(QUIET + overrides)
    assert needle in str(info.value.__cause__), info.value.__cause__


def test_modifier_keys_compose_with_the_losses_that_accept_them_and_build():
    """loss.wpo / ld_alpha / f_divergence on DPO, and inside a combination's term, build the
    modifiers with those values (and the needs they bring)."""
    node = typed(["loss.wpo=true", "loss.ld_alpha=0.5", "loss.f_divergence=alpha_divergence", "loss.f_alpha=0.3"])
    loss = build_loss(node)
    assert isinstance(loss, DPOLoss) and loss.needs == {"shared", "wpo"}
    ld, wpo, f = loss.modifiers
    assert (ld.ld_alpha, wpo.wpo, f.f_divergence, f.f_alpha) == (0.5, True, "alpha_divergence", 0.3)
    combo = build_loss(typed(["loss=mpo", "loss.terms.dpo.wpo=true", "loss.terms.bco_pair.ld_alpha=0.2"]))
    assert isinstance(combo, Combination) and combo.needs == {"shared", "wpo"}
    assert combo.terms["dpo"].modifiers[1].wpo and combo.terms["bco_pair"].modifiers[0].ld_alpha == 0.2
    assert repr(build_loss(typed(["loss=rpo"]))) == repr(DPOLoss(nll_weight=1.0))


@pytest.mark.parametrize(
    "overrides, unpaired, micro, needles",
    [
        (["loss.ld_alpha=1.5"], False, 4, ["loss.ld_alpha=1.5 must be in [0, 1]"]),
        (["loss.f_divergence=kl"], False, 4, ["loss.f_divergence='kl' is not one of reverse_kl"]),
        (["loss=exo_pair", "loss.epsilon=0"], False, 4, ["loss.epsilon=0.0 must be in (0, 1)"]),
        (["loss=mpo", "+loss.weights.sfft=0.5"], False, 4, ["loss.weights.sfft=0.5 names no term"]),
        (
            ["loss=mpo", "loss.terms.dpo.beta=-1", "loss.weights.sft=-1"],
            False,
            4,
            ["loss.terms.dpo.beta=-1.0 must be > 0", "loss.weights.sft=-1"],
        ),
        (["loss=combo"], False, 4, ["loss.terms is empty"]),
        (["loss=mpo"], True, 4, ["loss: dpo, bco_pair needs preference pairs"]),
        (["loss=kto", "loss.beta=-1"], False, 1, ["loss.beta=-1.0 must be > 0", "train.micro_batch_size=1: KTO"]),
    ],
)
def test_loss_problems_name_every_problem_with_its_key(overrides, unpaired, micro, needles):
    problems, terms = loss_problems(typed(overrides), unpaired=unpaired, micro_batch_size=micro)
    for needle in needles:
        assert any(p.startswith(needle) for p in problems), (needle, problems)
    assert terms or overrides == ["loss=combo"], "the terms (or their classes) are returned, built or not"


def test_loss_problems_of_a_plain_mapping_without_a_schema():
    """A user's own `_target_` with no schema: the target must import and take every key."""
    ok = {"_target_": "dpo_cli.losses.DPOLoss", "beta": 0.2, "wpo": True}
    problems, terms = loss_problems(ok, unpaired=False, micro_batch_size=2)
    assert problems == [] and terms[""].beta == 0.2 and terms[""].needs == {"wpo"}
    bad = {"_target_": "dpo_cli.losses.AOTLoss", "wpo": True}
    problems, terms = loss_problems(bad, unpaired=False, micro_batch_size=2)
    assert problems == [
        "loss.wpo is not a parameter of dpo_cli.losses.AOTLoss; allowed: beta, label_smoothing, ld_alpha"
    ]
    problems, _ = loss_problems({"_target_": "dpo_cli.losses.Nope"}, unpaired=False, micro_batch_size=2)
    assert problems == ["loss._target_='dpo_cli.losses.Nope' cannot be imported; check the dotted path"]
