"""The data section of the config, typed: its dataclasses, its checks and its old spellings.

`DataConfig` is `cfg.data`; a mixture's sources are `SourceConfig`s (a data section without a
mixture of its own: mixtures do not nest). `data.format` is a `_target_` node whose schema is
generated from the format class (`register_schemas`: /schema/format/<name>, which
`conf/data/<name>.yaml` extends), or a format's name (`data.format: hh`). The YAML files under
`conf/data/` hold only what differs from the defaults below, whose comments document each key.

Imports no torch, transformers or datasets: the schema and the config checks read this module
before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from dpo_cli.data.formats import Format, format_class, format_classes, make_format
from dpo_cli.modeling.options import positive
from dpo_cli.options import SCHEMA_GROUP, options_of, target_path

CACHE_DIR = "${oc.env:DPO_CLI_CACHE_DIR,'~/.cache/dpo-cli/tokenized'}"
TRUNCATION_MODES = ("keep_end", "keep_start")
# Settings a mixture applies to all its sources (tokenization happens once, on the mixed pairs).
MIX_WIDE = ("max_length", "max_prompt_length", "truncation_mode", "chat_template", "cache_dir")
# Old dotted keys -> new ones (a prefix covers the keys below it): for rewriting old command
# lines and the configs recorded by old runs. Where an old config names its format by a string
# (`format: shp`) and sets one of these, the new `data.format` is that format's node
# (`make_format("shp")`'s options, `_target_` included) with the moved keys; the old
# `format: mix` is `format: null` beside its `mixture`.
RENAMED = {
    "data.columns": "data.format.columns",
    "data.shp_max_pairs_per_post": "data.format.max_pairs_per_post",
    "data.synthetic": "data.format",
}

# data.format values an earlier version recorded that name no format class now: `mix` (a
# mixture has no format of its own: `format: null`).
NOT_FORMATS_NOW = {"mix": None}


def recorded_format(name: str) -> str | None:
    """The `_target_` that an earlier version's recorded `data.format: NAME` stands for (None:
    no format, a mixture); ValueError for a name that is no format."""
    if name in NOT_FORMATS_NOW:
        return NOT_FORMATS_NOW[name]
    return target_path(format_class(name))


@dataclass
class SourceConfig:
    """One data source: a format and where its rows come from (a mixture's source, or the
    data section itself, see `DataConfig`)."""

    # how rows become examples: a `_target_` node (data=<name> picks conf/data/<name>.yaml, which
    # sets it), or a format's name (data.format=hh: its module dpo_cli/data/formats/hh.py)
    format: Any = MISSING
    hub_id: Optional[str] = None  # hub dataset, used when path is null
    hub_config: Optional[str] = None  # the hub dataset's config name; null = its default
    hub_data_dir: Optional[str] = None  # the hub dataset's subset directory; null = all
    # local file(s): .jsonl, .json, .parquet, .csv (optionally .gz, not .parquet), or a directory
    # of them (files named by split are read by split); null = hub_id
    path: Optional[str] = None
    eval_path: Optional[str] = None  # local eval file; null = hub eval_split, or eval_holdout pairs held out of path
    train_split: str = "train"  # hub split (or split-named files of a directory) to train on
    eval_split: Optional[str] = None  # hub split to evaluate on (used when path is null, or a directory has it)
    # with a local path and no eval_path: pairs held out of training for evaluation (below 1: a
    # share, e.g. 0.05)
    eval_holdout: float = 256
    max_train_pairs: Optional[int] = None  # keep at most this many training pairs (a seeded random sample); null = all
    max_eval_pairs: Optional[int] = 512  # keep at most this many eval pairs (a seeded random sample); null = all
    max_length: int = 512  # longest prompt + response, in tokens
    max_prompt_length: int = 256  # longest prompt, in tokens (cut first when a pair is too long)
    truncation_mode: str = "keep_end"  # which end of a long prompt to keep: keep_end (last turns), keep_start
    # Jinja chat template file for message-list fields, instead of the tokenizer's own; null = the tokenizer's
    chat_template: Optional[str] = None
    # tokenized data cache (env DPO_CLI_CACHE_DIR overrides); keyed by data, tokenizer, lengths; null = off
    cache_dir: Optional[str] = CACHE_DIR


@dataclass
class DataConfig(SourceConfig):
    """The data section: one source, or a mixture of sources (`mixture` set, `format` null)."""

    # name -> a source (another conf/data file), added with +data@data.mixture.NAME=DATA; null = no mixture
    mixture: Optional[dict[str, SourceConfig]] = None
    # name -> share in (0, 1] of that source's training pairs used (default 1.0), as alignment-handbook's dataset mixer
    weights: dict[str, float] = field(default_factory=dict)


def format_schema(cls: type[Format]) -> type:
    """The options dataclass of a format (`dpo_cli.options.options_of`), its `columns` typed
    by the format's fields (each a column name, null = the field's own name): then
    `data.format.columns.chosen=good` needs no `+`, and a field the format lacks fails when
    Hydra composes the config."""
    node = options_of(cls)
    if "columns" not in {f.name for f in dataclasses.fields(node)}:
        return node
    columns = dataclasses.make_dataclass(
        f"{cls.__name__}Columns", [(name, Optional[str], None) for name in (*cls.fields, *cls.optional)]
    )
    return dataclasses.make_dataclass(
        node.__name__, [("columns", columns, dataclasses.field(default_factory=columns))], bases=(node,)
    )


def register_schemas() -> None:
    """Store each format's options as /schema/format/<name>, for conf/data/<name>.yaml's
    `- /schema/format/<name>@format` default."""
    store = ConfigStore.instance()
    for cls in format_classes():
        store.store(group=f"{SCHEMA_GROUP}/format", name=cls.name, node=format_schema(cls))


def is_mixture(d: SourceConfig) -> bool:
    """Whether the section is a mixture of sources (data=mix), not one source."""
    return isinstance(d, DataConfig) and d.mixture is not None


def unpaired(d: SourceConfig) -> bool:
    """Whether the data yields unpaired examples (completions with a label), which only losses
    that do not need pairs train on."""
    if is_mixture(d):
        return any(unpaired(s) for s in (d.mixture or {}).values())
    try:
        return not make_format(d.format).paired
    except ValueError:  # data_problems reports it
        return False


def _format_problems(d: SourceConfig) -> list[str]:
    """The format: it must build, check its own options, and have rows to read."""
    try:
        fmt: Format = make_format(d.format)
    except ValueError as e:
        return [str(e)]
    out = fmt.problems()
    if fmt.reads_rows and d.path is None and d.hub_id is None:
        out.append(f"data: set data.path (a local file) or data.hub_id for format {fmt.name!r}")
    return out


def _length_problems(d: SourceConfig) -> list[str]:
    out = positive("data.max_length", d.max_length) + positive("data.max_prompt_length", d.max_prompt_length)
    if not out and d.max_prompt_length >= d.max_length:
        out.append(
            f"data.max_prompt_length={d.max_prompt_length} must be smaller than "
            f"data.max_length={d.max_length}, leaving room for the response"
        )
    if d.truncation_mode not in TRUNCATION_MODES:
        out.append(
            f"data.truncation_mode={d.truncation_mode!r} is not one of {', '.join(TRUNCATION_MODES)}; "
            "set data.truncation_mode=<one of them>"
        )
    return out


def _common_problems(d: SourceConfig) -> list[str]:
    """Lengths, caps, the chat template file and the hold-out, of a source or a mixture."""
    out = _length_problems(d)
    out += positive("data.max_train_pairs", d.max_train_pairs, allow_none=True)
    out += positive("data.max_eval_pairs", d.max_eval_pairs, allow_none=True)
    if d.chat_template is not None and not os.path.isfile(os.path.expanduser(d.chat_template)):
        what = "is a directory" if os.path.isdir(os.path.expanduser(d.chat_template)) else "no such file"
        out.append(f"data.chat_template={d.chat_template!r}: {what}; point it at a Jinja chat template file")
    if d.eval_holdout < 0:
        out.append(f"data.eval_holdout={d.eval_holdout} must be >= 0")
    return out


def _source_problems(d: SourceConfig) -> list[str]:
    """A single source's problems: its format, then the common ones."""
    return _format_problems(d) + _common_problems(d)


def _mixture_problems(d: DataConfig) -> list[str]:
    """Sources are data sections of their own, all paired or all unpaired; weights name
    sources and lie in (0, 1]."""
    sources = dict(d.mixture or {})
    out = []
    if not sources:
        out.append("data=mix needs sources: add them with +data@data.mixture.NAME=DATA (e.g. +data@data.mixture.hh=hh)")
    if d.format is not None:
        out.append(
            "data.format and data.mixture are both set: a mixture's sources have their own formats; "
            "start from data=mix (data.format=null)"
        )
    for name, source in sources.items():
        out += [
            line.replace("data.", f"data.mixture.{name}.").replace("data:", f"data.mixture.{name}:")
            for line in _source_problems(source)
        ]
    if len({unpaired(s) for s in sources.values()}) > 1:
        out.append("data.mixture mixes paired and unpaired (kto) sources; a run trains on one kind")
    for name, w in dict(d.weights or {}).items():
        if name not in sources:
            out.append(f"data.weights.{name}={w} names no source; the sources are: {', '.join(sources) or 'none'}")
        elif isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0 < w <= 1:
            out.append(f"data.weights.{name}={w!r} must be in (0, 1]: the share of that source's training pairs used")
    return out


def data_problems(d: DataConfig) -> list[str]:
    """Every problem of the data section, one message each naming the key (`data.…`, or
    `data.mixture.NAME.…` in a source), the bad value and the fix."""
    if is_mixture(d):
        return _mixture_problems(d) + _common_problems(d)
    return _source_problems(d)


def input_files(d: DataConfig) -> dict[str, str]:
    """The local files a data section reads (key -> path): an export must never replace one."""
    keys = ("path", "eval_path", "chat_template")
    found = {f"data.{k}": getattr(d, k) for k in keys if getattr(d, k)}
    for name, source in (d.mixture or {}).items():
        found.update({f"data.mixture.{name}.{k}": getattr(source, k) for k in keys if getattr(source, k)})
    return found
