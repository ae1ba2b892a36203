"""Options dataclasses generated from a target's signature, registered in Hydra's ConfigStore.

A `_target_` node (a loss, an optimizer, a judge, a data format) gets its schema from the
class it names: one field per keyword parameter, typed from the annotation and defaulting to
the parameter's default, plus `_target_` (and `_partial_`). The value is then written once, in
the signature; the YAML files under `conf/` hold only what differs from it, and Hydra rejects an
unknown key or a wrongly typed value when it composes the config.

    register("loss", "dpo", DPOLoss)  # conf/loss/dpo.yaml: defaults: [/schema/loss/dpo@_here_, _self_]

Why our own and not hydra-zen's `builds(..., populate_full_signature=True)`: the targets are
our own classes plus torch's optimizers, and all we need is the field list; OmegaConf accepts
fewer annotation forms than Python (`float | Tensor`, `tuple[float, float]`, `Literal[...]`),
and this module narrows each to what a YAML value can be in a few lines, without a dependency.
This module imports no other part of dpo_cli.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SCALARS = (bool, int, float, str)
SCHEMA_GROUP = "schema"  # conf/<group>/<name>.yaml extends /schema/<group>/<name>


def import_target(path: str) -> Callable[..., Any]:
    """The class or function a `_target_` names (a dotted path)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def target_path(target: Callable[..., Any]) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def _field_type(hint: Any) -> Any:
    """What OmegaConf can hold for an annotation: a scalar (Optional if None is allowed), a
    float for int | float, else Any (lists, tuples, tensors, classes: checked by the target)."""
    if hint in SCALARS:
        return hint
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        kinds = {type(a) for a in typing.get_args(hint)}
        return kinds.pop() if len(kinds) == 1 and kinds <= set(SCALARS) else Any
    if origin not in (Union, types.UnionType):
        return Any
    args = typing.get_args(hint)
    optional = type(None) in args
    scalars = [a for a in args if a in SCALARS]
    inner = scalars[0] if len(scalars) == 1 else float if set(scalars) == {int, float} else None
    if inner is None:
        return Any
    return Optional[inner] if optional else inner  # noqa: UP045 - OmegaConf reads typing.Optional


def _hints(target: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: the field is typed Any
        return {}


def _factories(target: Callable[..., Any]) -> dict[str, Callable[[], Any]]:
    """A dataclass target's fields made by a default_factory (field name -> factory)."""
    if not (inspect.isclass(target) and dataclasses.is_dataclass(target)):
        return {}
    return {
        f.name: f.default_factory for f in dataclasses.fields(target) if f.default_factory is not dataclasses.MISSING
    }


def options_of(target: str | Callable[..., Any], partial: bool = False, skip: tuple[str, ...] = ()) -> type:
    """A dataclass of `target`'s keyword parameters (less `skip`): `_target_` naming it (as given,
    when a dotted path), `_partial_` when the call completes at run time (an optimizer gets its
    parameters), and one field per parameter, typed by `_field_type`, with the parameter's
    default (required ones: MISSING)."""
    path = target if isinstance(target, str) else target_path(target)
    target = import_target(target) if isinstance(target, str) else target
    hints = _hints(target)
    factories = _factories(target)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=path))]
    if partial:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    for name, p in inspect.signature(target).parameters.items():
        if name in ("self", *skip) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind = _field_type(hints.get(name, Any))
        default = MISSING if p.default is p.empty else p.default
        if name in factories:  # a dataclass field's default_factory: its signature shows a sentinel
            default = factories[name]()
        if isinstance(default, (list, tuple, dict)):
            value = dataclasses.field(default_factory=lambda d=default: type(d)(d) if isinstance(d, dict) else list(d))
        else:
            value = dataclasses.field(default=default)
            if default is None and kind is not Any and typing.get_origin(kind) is not Union:
                kind = Optional[kind]  # noqa: UP045
        fields.append((name, kind, value))
    return dataclasses.make_dataclass(f"{target.__name__}Options", fields)


def takes_any_key(target: str) -> bool:
    """Whether the target a dotted path names takes **kwargs (its keys cannot be checked by name)."""
    params = inspect.signature(import_target(target)).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in params)


def built_or_reported(problems: list[str], key: str, make: Callable[[], Any]) -> Any:
    """`make()`, or None with each line of its error added to `problems` prefixed with `key`:
    a `_target_` object checks its own values (beta > 0) in its constructor, one line each."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - any construction failure is a config problem
        cause = e.__cause__ or e
        problems.extend(f"{key}.{line}" for line in str(cause).splitlines())
        return None


def register(group: str, name: str, target: str | Callable[..., Any], **kwargs: Any) -> type:
    """Store `options_of(target)` as /schema/<group>/<name>, for conf/<group>/<name>.yaml to extend."""
    node = options_of(target, **kwargs)
    ConfigStore.instance().store(group=f"{SCHEMA_GROUP}/{group}", name=name, node=node)
    return node
