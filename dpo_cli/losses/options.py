"""The losses' config: one typed schema per loss class, its checks, and building a loss from it.

`register_schemas` stores, for every loss class of `dpo_cli.losses`, a dataclass of its
constructor's keyword parameters plus the keys of the modifiers it accepts (both generated
from signatures: `options.options_of`) as /schema/loss/<ClassName> in Hydra's ConfigStore. A
conf/loss/<name>.yaml extends it and holds only what differs from those defaults:

    defaults:
      - /schema/loss/DPOLoss@_here_
      - _self_

so that a misspelled key (`loss.bta=1`), a wrong type (`loss.beta=abc`) or a modifier key the
loss does not accept (`loss=aot loss.wpo=true`) fails when Hydra composes the config.

`loss_problems` checks a composed loss node (typed: `OmegaConf.to_object` of it; or a plain
dict for a custom `_target_` with no schema) with every problem prefixed by its key, and
`build_loss` builds it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dpo_cli import losses
from dpo_cli.batch import KL_ROWS
from dpo_cli.losses.base import Loss
from dpo_cli.losses.combination import Combination, check_weights
from dpo_cli.options import SCHEMA_GROUP, built_or_reported, import_target, options_of

GROUP = "loss"
PACKAGE = "dpo_cli.losses"  # the `_target_` prefix the recorded configs name (dpo_cli.losses.DPOLoss)


def loss_classes() -> list[type[Loss]]:
    """Every loss class `dpo_cli.losses` exports (the package's `__all__`), in that order."""
    found = (getattr(losses, name) for name in losses.__all__)
    return [c for c in found if inspect.isclass(c) and issubclass(c, Loss) and c is not Loss]


def schema_of(cls: type[Loss]) -> type:
    """`<Class>Options`: `_target_` (dpo_cli.losses.<Class>), the class's keyword parameters and
    the keys of the modifiers it accepts, each with its type and default."""
    own = options_of(f"{PACKAGE}.{cls.__name__}")
    names = {f.name for f in dataclasses.fields(own)}
    extra = []
    for modifier in cls.accepts:
        for f in dataclasses.fields(options_of(modifier)):
            if f.name != "_target_" and f.name not in names:
                extra.append((f.name, f.type, dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Options", extra, bases=(own,))


def register_schemas() -> dict[str, type]:
    """Store `schema_of` every loss class as /schema/loss/<ClassName>; returns them by name."""
    store = ConfigStore.instance()
    schemas = {cls.__name__: schema_of(cls) for cls in loss_classes()}
    for name, schema in schemas.items():
        store.store(group=f"{SCHEMA_GROUP}/{GROUP}", name=name, node=schema)
    return schemas


def _fields(node: Any) -> dict[str, Any]:
    """A loss node's keys and values, one level deep: a typed options object or a mapping."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    if isinstance(node, DictConfig):  # typed as the other callers see it
        return _fields(OmegaConf.to_object(node))
    if isinstance(node, Mapping):
        return dict(node)
    raise TypeError(f"a loss node is a mapping with a _target_, not {type(node).__name__}")


def _plain(value: Any) -> Any:
    """Typed options objects (nested in a combination's terms) as plain dicts, for instantiate."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in _fields(value).items()}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def build_loss(node: Any) -> Loss:
    """The loss a node describes (typed options object, mapping or DictConfig), terms included;
    its own checks raise ValueError (one line per problem) or TypeError."""
    return instantiate(_plain(_fields(node)))


def _target_problems(key: str, fields: dict[str, Any]) -> list[str]:
    """For a node without a schema: its `_target_` imports and takes every other key."""
    path = fields.get("_target_")
    if not isinstance(path, str):
        return [f"{key} must be a mapping with a _target_ (see conf/loss/)"]
    try:
        target = import_target(path)
    except (ImportError, AttributeError, ValueError):
        return [f"{key}._target_={path!r} cannot be imported; check the dotted path"]
    params = inspect.signature(target).parameters
    accepted = [n for n in params if n != "self" and params[n].kind is not params[n].VAR_KEYWORD]
    if inspect.isclass(target) and issubclass(target, Loss):
        accepted += [k for m in target.accepts for k in m.keys()]
    elif any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    return [
        f"{key}.{name} is not a parameter of {path}; allowed: {', '.join(accepted)}"
        for name in fields
        if name not in ("_target_", "_partial_") and name not in accepted
    ]


def _build(problems: list[str], key: str, node: Any) -> Loss | None:
    """Build one node; each line of its error becomes a problem prefixed with `key`."""
    fields = _fields(node)
    found = _target_problems(key, fields)
    if found:
        problems.extend(found)
        return None
    return built_or_reported(problems, key, lambda: build_loss(fields))


def _loss_class(fields: dict[str, Any]) -> Any:
    """The class a loss node names, for its capability flags when it could not be built."""
    try:
        return import_target(str(fields["_target_"]))
    except Exception:  # noqa: BLE001 - already reported
        return None


def _terms(problems: list[str], fields: dict[str, Any]) -> dict[str, Any]:
    """A combination's terms, each built on its own (its problems named by its key), then the
    combination's own checks; terms that did not build are given as their classes."""
    nodes = {name: _fields(n) for name, n in dict(fields.get("terms") or {}).items()}
    built = {name: _build(problems, f"loss.terms.{name}", n) for name, n in nodes.items()}
    if all(t is not None for t in built.values()):
        _build(problems, "loss", fields)  # the combination's own checks (weights, no terms, ...)
    else:
        weights = fields.get("weights") or {}
        problems.extend(f"loss.{p}" for p in check_weights(list(nodes), dict(weights)))
    return {name: t if t is not None else _loss_class(nodes[name]) for name, t in built.items()}


def _is_combination(fields: dict[str, Any]) -> bool:
    target = _loss_class(fields)
    return "terms" in fields or (inspect.isclass(target) and issubclass(target, Combination))


def loss_problems(node: Any, unpaired: bool, micro_batch_size: int) -> tuple[list[str], dict[str, object]]:
    """The problems of a composed loss node (each prefixed `loss.` or `loss.terms.<name>.`) and
    its terms by name (built losses, or their classes when they did not build; a single loss is
    the term ""): the loss's own range checks, then what it needs of the data: pairs, and two
    examples per micro batch for KTO's KL rows. A loss that does not build still has its data
    needs checked, from its class."""
    problems: list[str] = []
    fields = _fields(node)
    if _is_combination(fields):
        parts = _terms(problems, fields)
    else:
        loss = _build(problems, "loss", fields)
        parts = {"": loss if loss is not None else _loss_class(fields)}
    parts = {name: p for name, p in parts.items() if p is not None}
    paired = [
        name or getattr(p, "__name__", type(p).__name__) for name, p in parts.items() if getattr(p, "paired", True)
    ]
    if unpaired and paired:
        problems.append(
            f"loss: {', '.join(paired)} needs preference pairs, but data.format holds unpaired "
            "prompt/completion/label examples; use loss=kto (or loss=sft), or paired data"
        )
    if any(KL_ROWS in getattr(p, "needs", ()) for p in parts.values()) and micro_batch_size < 2:
        problems.append(
            f"train.micro_batch_size={micro_batch_size}: KTO estimates its KL reference point from "
            "mismatched prompt/completion pairs of a micro batch, so it needs >= 2 examples per micro batch"
        )
    return problems, parts
