"""Data formats, one module each: `dpo_cli/data/formats/<name>.py` defines one `Format` subclass.

Nothing here lists the formats: they are found by importing this package's modules
(`format_classes`), and a format named by a bare string (`data.format: hh` in a user's YAML, or
`data.format=hh` on the command line) is the class of the module of that name (`format_class`).
Adding a format is one module, one `conf/data/<name>.yaml` and its tests.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from typing import Any

from dpo_cli.data.formats.base import Example, Format

__all__ = ["Example", "Format", "format_class", "format_classes", "format_names", "hints", "make_format"]

_NOT_FORMATS = ("base",)  # modules of this package that hold no format


def _class_in(module: Any) -> type[Format] | None:
    """The `Format` subclass a module defines (not one it imports), or None."""
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, Format) and obj is not Format and obj.__module__ == module.__name__:
            return obj
    return None


@functools.cache
def format_classes() -> tuple[type[Format], ...]:
    """Every format of this package, by module name."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in _NOT_FORMATS:
            cls = _class_in(importlib.import_module(f"{__name__}.{info.name}"))
            if cls is not None:
                found.append(cls)
    return tuple(found)


def format_names() -> list[str]:
    return [cls.name for cls in format_classes()]


def format_class(name: str) -> type[Format]:
    """The format named `name` (the module `dpo_cli/data/formats/<name>.py`); ValueError when
    there is none, naming the formats there are."""
    known = {cls.name: cls for cls in format_classes()}
    if name not in known:
        raise ValueError(
            f"data.format={name!r} is not one of {', '.join(known)}; set data=<one of them> "
            "(or data.format._target_=a format class)"
        )
    return known[name]


def hints() -> list[tuple[frozenset[str], type[Format], str]]:
    """(columns, format, message) of every format with a hint, the most specific (most
    columns) first, so that rows fitting two formats get the narrower one."""
    found = [(cls.hint[0], cls, cls.hint[1]) for cls in format_classes() if cls.hint is not None]
    return sorted(found, key=lambda h: -len(h[0]))


def _plain(value: Any) -> Any:
    """Mappings and dataclass instances (a typed config's children, e.g. the columns) as plain
    dicts, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def make_format(node: Any) -> Format:
    """The format object for a `data.format` value: a built format; a name (`"hh"`); the
    options dataclass Hydra generated for one (a `_target_` field and the class's options); or
    a mapping with `_target_`. ValueError, with the key and the fix, for anything else."""
    if isinstance(node, Format):
        return node
    if isinstance(node, str):
        return format_class(node)()
    options = _plain(node)
    if not isinstance(options, dict) or "_target_" not in options:
        raise ValueError(f"data.format={node!r} is not a format; set data=<format> or data.format._target_=CLASS")
    target = str(options.pop("_target_"))
    options.pop("_partial_", None)
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"data.format._target_={target!r} cannot be imported; check the dotted path") from None
    if not (isinstance(cls, type) and issubclass(cls, Format)):
        raise ValueError(
            f"data.format._target_={target!r} is not a data format (a subclass of {Format.__module__}.Format)"
        )
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"data.format: {target} does not take these options ({e})") from None
