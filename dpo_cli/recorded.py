"""A run's recorded config (its .hydra/config.yaml) read back typed, whichever version wrote it."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_cli.checkpoint.compat import migrated
from dpo_cli.config import register_configs, registered_keys
from dpo_cli.errors import ConfigError
from dpo_cli.schema import Config


def saved_config(path: Any) -> Config:
    """A run's recorded config (its .hydra/config.yaml), typed. What an earlier version recorded
    is read as this version records it (`compat.migrated`: renamed keys, a format by name), and
    keys this version no longer has (or that the recorded `_target_` does not take) are dropped."""
    return typed_record(OmegaConf.to_container(OmegaConf.load(path), resolve=False), path)


def typed_record(recorded: Any, path: Any = "the config") -> Config:
    """A recorded config's plain values (as .hydra/config.yaml holds them), typed as `saved_config`
    types them; `path` names it in an error."""
    register_configs()  # the schemas of the `_target_`s it may name (registering again changes nothing)
    base, registered = OmegaConf.structured(Config), registered_keys()
    flat = migrated(_flat(recorded))
    targets = {k.removesuffix("._target_"): str(v) for k, v in flat.items() if k.endswith("._target_")}
    node = OmegaConf.create({})
    for key, value in flat.items():
        parent, _, name = key.rpartition(".")
        takes = registered.get(targets.get(parent, ""))
        unset_column = parent.endswith(".columns") and value is None  # null: the field's own name
        if _in_schema(base, key) and (takes is None or name in takes) and not unset_column:
            OmegaConf.update(node, key, value, force_add=True)
    try:
        return OmegaConf.to_object(OmegaConf.merge(base, node))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError([f"{path}: the run's recorded config cannot be read: {str(e).splitlines()[0]}"]) from None


def _in_schema(base: DictConfig, key: str) -> bool:
    """Whether the typed sections on `key`'s path all have it (below an Any node, anything goes)."""
    node: Any = base
    for part in key.split("."):
        if not isinstance(node, DictConfig) or node._is_none():
            return True
        if part not in node.keys():  # (`in` leaves out a key whose value is missing, ???)
            return False
        node = node._get_node(part)
    return True


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves by dotted key; `_target_` nodes (loss, optimizer, judge) and free
    mappings stay whole, as the schema types them Any."""
    if not isinstance(node, dict) or "_target_" in node or not node:
        return {prefix.rstrip("."): node}
    flat: dict[str, Any] = {}
    for k, v in node.items():
        flat.update(_flat(v, f"{prefix}{k}."))
    return flat
