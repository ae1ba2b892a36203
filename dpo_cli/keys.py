"""Keys the schema does not define, and the key a user meant.

The typed schema rejects a misspelled `key=value` when Hydra composes the config, in Hydra's
words; `not_a_key` says it with the closest key (`train.bath_size` -> `train.batch_size`, `lr`
-> `optimizer.lr`), and `unknown_keys` finds the keys `+key=value` added, which nothing reads.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpo_cli.schema import Config


def _schema_sections(schema: type, prefix: str = "") -> dict[str, type | None]:
    """Every dotted key `schema` defines -> the dataclass of its section, or None for a value or
    a free-form mapping (model.random_init, data.mixture, data.weights, loss, optimizer)."""
    keys: dict[str, type | None] = {}
    for name, hint in typing.get_type_hints(schema).items():
        inner = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
        section = inner[0] if len(inner) == 1 and is_dataclass(inner[0]) else None
        keys[prefix + name] = section  # type: ignore[assignment]
        if section is not None:
            keys.update(_schema_sections(section, f"{prefix}{name}."))  # type: ignore[arg-type]
    return keys


def _dotted(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a plain nested dict, parents before their children."""
    keys: list[str] = []
    for key, value in node.items() if isinstance(node, dict) else ():
        keys.append(f"{prefix}{key}")
        keys.extend(_dotted(value, f"{prefix}{key}."))
    return keys


def _unknown(present: list[str], sections: dict[str, type | None]) -> list[str]:
    """The keys of `present` that sit in a typed section (or at the top) but are not in it."""
    typed = [k for k in present if k.count(".") == 0 or sections.get(k.rpartition(".")[0]) is not None]
    return [k for k in typed if k not in sections and k != "hydra"]


def not_a_key(key: str, cfg: DictConfig | None = None) -> str:
    """'KEY is not a config key; did you mean X?': X the closest key of KEY's section (by name),
    else a key of the same name elsewhere (`lr` -> optimizer.lr). Candidates: the schema's keys
    and those `cfg` holds in free-form sections (optimizer.lr, loss.beta)."""
    sections = _schema_sections(Config)
    present = _dotted(OmegaConf.to_container(cfg, resolve=False)) if cfg is not None else []
    unknown = set(_unknown(present, sections))
    valid = sorted(
        {*sections, *(k for k in present if not any(k == u or k.startswith(u + ".") for u in unknown))} - {key}
    )
    valid = [k for k in valid if k.split(".")[0] != "hydra"]
    section, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == section}
    match = [siblings[m] for m in difflib.get_close_matches(name, list(siblings), n=1)]
    same_name = [k for k in valid if k.rpartition(".")[2] == name]
    shallowest = min((k.count(".") for k in same_name), default=0)
    match = match or [k for k in same_name if k.count(".") == shallowest][:3]
    if match:
        return f"{key} is not a config key; did you mean {' or '.join(match)}?"
    where = f" of {section}" if section else ""
    return f"{key} is not a config key; `dpo-train --cfg job` prints the keys{where}"


def unknown_keys(cfg: DictConfig) -> list[str]:
    """A problem for each key of `cfg` the schema does not define. The typed schema rejects a
    misspelled `key=value` at compose time, but `+key=value` adds any key, which nothing reads."""
    present = _dotted(OmegaConf.to_container(cfg, resolve=False))
    return [not_a_key(k, cfg) for k in _unknown(present, _schema_sections(Config))]
