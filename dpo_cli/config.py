"""Whole-config validation: every problem at once, before any weights load.

The schema (`dpo_cli.schema` and the sections' own modules) makes an unknown key or a wrongly
typed value fail when Hydra composes the config. `validate` gathers the rest and reports every
problem at once, before any weights are loaded: each section's own checks (beside its
dataclass), the `_target_` nodes built (so that a loss checks its own ranges), and the rules
between sections (the loss against the data, fp16 against the model's dtype). It returns the
typed config (`OmegaConf.to_object`), which is all the parts below the entry point read. It
reads every part's options, so it sits above them: no part imports this module.
"""

from __future__ import annotations

import copy
import logging
import numbers
import os
from collections.abc import Sequence
from dataclasses import fields as dataclass_fields
from dataclasses import is_dataclass
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_cli import harness, options, tasks, tracking
from dpo_cli.batch import KL_ROWS
from dpo_cli.compiling import compiler_problem
from dpo_cli.data.options import data_problems, input_files
from dpo_cli.data.options import register_schemas as register_format_schemas
from dpo_cli.data.options import unpaired as unpaired_data
from dpo_cli.distributed import cpu_only
from dpo_cli.errors import ConfigError
from dpo_cli.keys import unknown_keys
from dpo_cli.losses.options import loss_problems
from dpo_cli.losses.options import register_schemas as register_loss_schemas
from dpo_cli.modeling.diagnostics import model_problems
from dpo_cli.modeling.options import choice, reference_problems
from dpo_cli.optimizers import missing_package, optimizer_problems, run_device
from dpo_cli.publish import push_problems
from dpo_cli.schema import (
    MODES,
    TASKS,
    Config,
    as_plain,
    eval_problems,
    harness_problems,
    logger_problems,
    scheduler_problems,
    train_problems,
)

log = logging.getLogger(__name__)

# Generated schemas of the `_target_` options a conf/ group offers: (group, name, target, options_of kwargs).
OPTIMIZERS = ("AdamW", "RMSprop")
JUDGES = ("SortJudge", "RewardModelJudge")


def register_configs() -> None:
    """Register the schema that `conf/config.yaml` names first in its defaults list, and the
    generated options of the optimizers, judges, data formats and losses that conf/optimizer,
    conf/judge, conf/data and conf/loss extend."""
    ConfigStore.instance().store(name="dpo_cli_schema", node=Config)
    for name in OPTIMIZERS:
        options.register("optimizer", name, f"torch.optim.{name}", partial=True, skip=("params",))
    for name in JUDGES:
        options.register("judge", name, f"dpo_cli.judges.{name}")
    register_format_schemas()  # /schema/format/<name>, which conf/data/*.yaml extend
    register_loss_schemas()  # /schema/loss/<Class>, which conf/loss/*.yaml extend


def node_fields(node: Any) -> dict[str, Any]:
    """A `_target_` node's keys and values, typed (an options object) or not (a mapping)."""
    if is_dataclass(node):
        return {f.name: getattr(node, f.name) for f in dataclass_fields(node)}
    return dict(node) if isinstance(node, dict) else {}


def _target_nodes(node: Any, prefix: str = "") -> list[tuple[str, DictConfig]]:
    """Every `_target_` node of the composed config, with its dotted key."""
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or node._is_interpolation():
        return []
    found = [(prefix.rstrip("."), node)] if "_target_" in node else []
    for k in node:
        if k != "hydra" and not OmegaConf.is_missing(node, k) and OmegaConf.is_config(node._get_node(k)):
            found += _target_nodes(node._get_node(k), f"{prefix}{k}.")
    return found


def registered_keys() -> dict[str, list[str]]:
    """`_target_` -> the keys of its schema, for every schema registered under /schema (a loss's
    include its modifiers' keys, which its signature takes as **modifiers)."""
    found: dict[str, list[str]] = {}
    for group in ConfigStore.instance().repo.get(options.SCHEMA_GROUP, {}).values():
        for entry in group.values():
            node = getattr(entry, "node", None)
            if isinstance(node, DictConfig) and "_target_" in node:
                found.setdefault(str(node._target_), list(node.keys()))
    return found


def target_key_problems(cfg: DictConfig) -> list[str]:
    """A problem for each key of a `_target_` node that its target does not take. A typed node
    refuses a misspelled `key=value` at compose time, but `+key=value` adds any key (which the
    typed object would then drop without a word), and `_target_=...` may name another class."""
    problems = []
    registered = registered_keys()
    for key, node in _target_nodes(cfg):
        allowed = registered.get(str(node._target_))
        if allowed is None and missing_package(str(node._target_)):
            continue  # said once, with the pip command, by optimizer_problems
        if allowed is None:
            try:
                if options.takes_any_key(str(node._target_)):
                    continue  # **kwargs: its own checks name what it takes (a loss: its modifiers' keys)
                allowed = [f.name for f in dataclass_fields(options.options_of(str(node._target_), skip=("params",)))]
            except (ImportError, AttributeError, ValueError):
                problems.append(f"{key}._target_={node._target_!r} cannot be imported; check the dotted path")
                continue
        allowed = [k for k in allowed if not k.startswith("_")]
        problems += [
            f"{key}.{k} is not a parameter of {node._target_}; allowed: {', '.join(allowed)}"
            for k in node
            if k not in allowed and not str(k).startswith("_")
        ]
    return problems


def typed_node(key: str, node: Any, group: str) -> tuple[Any, list[str]]:
    """`node` as its target's options object, or None and the problems: a typed node as it is
    (unless its `_target_` was changed: then as a mapping); a mapping (a target no conf/ file
    gives a schema) checked against its target's generated options, so that an unknown key or a
    wrong type is refused as in a typed node."""
    if is_dataclass(node):
        if type(node).__name__ == f"{str(node._target_).rpartition('.')[2]}Options":
            return node, []
        node = node_fields(node)
    if not isinstance(node, dict) or "_target_" not in node:
        return None, [f"{key} must be a mapping with a _target_ (see conf/{group}/)"]
    try:
        schema = options.options_of(str(node["_target_"]), partial=bool(node.get("_partial_")), skip=("params",))
    except (ImportError, AttributeError, ValueError):
        return None, [f"{key}._target_={node['_target_']!r} cannot be imported; check the dotted path"]
    known = {f.name for f in dataclass_fields(schema)}
    if set(node) - known:
        return None, []  # its keys the target does not take: reported by target_key_problems
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node)), []
    except OmegaConfBaseException as e:
        return None, [f"{key}.{e.key}={e.value!r} has the wrong type: {str(e).splitlines()[0]}"]  # type: ignore[attr-defined]


def _build(problems: list[str], key: str, node: Any, group: str) -> Any:
    """Instantiate a `_target_` node (typed, or a mapping checked against its target's generated
    options); the object checks its own value ranges (e.g. beta > 0) and each line of its
    ValueError becomes a problem prefixed with `key`."""
    node, found = typed_node(key, node, group)
    problems.extend(found)
    if node is None:
        return None
    return options.built_or_reported(problems, key, lambda: instantiate(node))


def _check_optimization(p: list[str], cfg: Config) -> None:
    """optimizer, scheduler and train sections, and the precision rules between them and the model."""
    fields = node_fields(cfg.optimizer)
    t = cfg.train
    # A missing package or a device it cannot run on: said once, without building it.
    refused = optimizer_problems(fields, run_device(), t)
    p.extend(refused)
    optimizer = None if refused else _build(p, "optimizer", cfg.optimizer, "optimizer")
    if fields and not fields.get("_partial_", False):
        p.append("optimizer._partial_ must be true: the parameters are passed at run time")
    lr = fields.get("lr")
    if optimizer is not None and isinstance(lr, numbers.Real) and lr <= 0:
        p.append(f"optimizer.lr={lr} must be > 0")
    p.extend(scheduler_problems(cfg.scheduler, t.max_steps) + train_problems(t))
    compiler = compiler_problem(cpu_only()) if t.compile else None
    if compiler:
        p.append(compiler)
    if t.mixed_precision == "fp16" and cpu_only():
        p.append("train.mixed_precision=fp16 needs a GPU (fp16 autocast does not run on CPUs); use bf16 or no")
    elif t.mixed_precision == "fp16" and cfg.model.dtype != "float32":
        p.append(
            f"train.mixed_precision=fp16 needs model.dtype=float32 (got {cfg.model.dtype}): the fp16 loss "
            "scaler cannot unscale half-precision gradients; set model.dtype=float32"
        )
    elif cfg.model.dtype == "float16" and cfg.model.lora.r is None and cfg.mode == "train":
        p.append(
            "model.dtype=float16 trains float16 weights without a loss scaler: small gradients underflow and "
            "large ones overflow to inf/NaN; use model.dtype=bfloat16, or model.dtype=float32 with "
            "train.mixed_precision=bf16 (or fp16 on a GPU); float16 base weights are fine under LoRA (model.lora.r)"
        )


def _check_export(p: list[str], cfg: Config) -> None:
    """inspect.export is a new file (or inspect.overwrite=true), and never the data it reports on:
    an export onto its own input would replace the rows with what they normalize to."""
    export = cfg.inspect.export
    if not export:
        return
    out = os.path.realpath(os.path.expanduser(export))
    if os.path.isdir(out):
        p.append(f"inspect.export={export!r} is a directory; give a file name, e.g. pairs.jsonl")
        return
    if cfg.mode != "inspect":
        return
    for key, path in input_files(cfg.data).items():
        source = os.path.realpath(os.path.expanduser(path))
        if out == source or out.startswith(source.rstrip(os.sep) + os.sep):
            p.append(f"inspect.export={export!r} is the input ({key}); write the export to another file")
            return
    if os.path.exists(out) and not cfg.inspect.overwrite:
        p.append(f"inspect.export={export!r} already exists; choose another file, or set inspect.overwrite=true")


def _objective_problems(c: Config, command_line: Sequence[str]) -> tuple[list[str], bool]:
    """The task's own checks, and the loss against the data and the reference section, with
    whether the loss needs a reference: a task that trains with its own objective (task=reward)
    reads neither loss nor reference, and refuses reference settings itself (`tasks.problems`)."""
    unpaired = unpaired_data(c.data)
    p = tasks.problems(c, command_line, unpaired) if c.task in TASKS else []
    if c.task in TASKS and not tasks.of(c).reads_loss:
        return p, False
    found, terms = loss_problems(c.loss, unpaired=unpaired, micro_batch_size=c.train.micro_batch_size)
    needs_reference = any(getattr(t, "requires_reference", True) for t in terms.values()) or not terms
    kl_rows = any(KL_ROWS in getattr(t, "needs", ()) for t in terms.values())
    return p + found + reference_problems(c.reference, c.model, needs_reference, kl_rows), needs_reference


def typed(cfg: DictConfig) -> Config:
    """The composed config as the schema's objects (interpolations resolved): what the parts read."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError([f"{getattr(e, 'full_key', '') or 'config'}: {str(e).splitlines()[0]}"]) from None


def validate(cfg: DictConfig, quiet: bool = False, command_line: Sequence[str] = ()) -> Config:
    """Check the whole composed config; raise one ConfigError listing every problem found, or
    return it typed. Each section checks itself; the loss is built here so that its own range
    checks run. `quiet`: no warnings (the command line's check before Hydra runs).
    `command_line`: the overrides given, which the task (`tasks.problems`) checks against what
    it reads."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError([f"{k} is required (it is ??? in the config); set {k}=<value>" for k in missing])
    unknown = unknown_keys(cfg) + target_key_problems(cfg)
    c = typed(_without_orphan_judge(cfg, quiet))
    if c.train.mixed_precision == "auto":
        c.train.mixed_precision = auto_precision(quiet)
    p: list[str] = unknown + choice("mode", c.mode, MODES) + choice("task", c.task, TASKS)
    if c.inspect.examples < 0:
        p.append(f"inspect.examples={c.inspect.examples} must be >= 0")
    _check_export(p, c)
    p.extend(model_problems(c.model, c.data.max_length))
    p.extend(data_problems(c.data))
    found, needs_reference = _objective_problems(c, command_line)
    p.extend(found)
    if c.export.merge_lora and c.model.lora.r is None:
        p.append("export.merge_lora=true needs LoRA (model.lora.r); a full fine-tune already exports the whole model")
    p.extend(push_problems(c.export, c.mode))  # last of the export checks: it may ask the network
    _check_optimization(p, c)
    p.extend(logger_problems(c.logger, c.train.save_every))
    p.extend(tracking.problems(c.logger, quiet))  # a missing package, an unreachable MLflow server
    if c.judge is not None:
        _build(p, "judge", c.judge, "judge")
    p.extend(eval_problems(c.eval, c.judge is not None))
    p.extend(_harness_problems(c, needs_reference))
    if p:
        raise ConfigError(list(dict.fromkeys(p)))  # a key two checks both refuse is one problem
    tasks.settle(c, quiet)
    return c


def _harness_problems(c: Config, needs_reference: bool) -> list[str]:
    """eval.harness: its values, then (only when they are sound: lm_eval indexes its tasks) the task
    names and datasets; and a reference to evaluate at the end of training."""
    h = c.eval.harness
    p = harness_problems(h, c.mode)
    if h.reference and h.at_end and c.mode == "train":  # (under LoRA too: the reference is the source's)
        if not needs_reference or c.reference.precompute:
            why = "reference.precompute=true" if needs_reference else "no loss term needs a reference"
            p.append(
                f"eval.harness.reference=true with eval.harness.at_end=true evaluates the reference model the run "
                f"holds at its end, and this run keeps none ({why}); set eval.harness.reference=false, and benchmark "
                "the model the run starts from on its own (mode=eval model.name_or_path=IT reference.name_or_path=IT)"
            )
    return p or harness.task_problems(h)


def auto_precision(quiet: bool = False) -> str:
    """What train.mixed_precision=auto is on this machine: bf16 autocast on a CUDA GPU that has
    bf16 (float32 weights, as TRL's default bf16=True), else none (a CPU, an fp16-only GPU). The
    typed config holds the result, so that a run records, and a resume compares, what it ran."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    value = "bf16" if bf16 else "no"
    if not quiet:
        where = "a CUDA GPU with bf16" if bf16 else "no CUDA GPU with bf16"
        log.info("train.mixed_precision=auto: %s (%s)", value, where)
    return value


def _without_orphan_judge(cfg: DictConfig, quiet: bool) -> DictConfig:
    """`cfg`, without judge settings that no judge takes: a recipe's judge.* values when a later
    group turned the judge off (experiment=X debug=default: debug chooses judge=none, and its
    values are left without a `_target_`). Said in a warning, not dropped silently."""
    judge = cfg.get("judge")
    if not isinstance(judge, DictConfig) or "_target_" in judge:
        return cfg
    if not quiet:
        keys = ", ".join(f"judge.{k}" for k in judge)
        log.warning(
            "%s are set, but no judge is chosen (judge=none, e.g. by debug=default): no generation evaluation, "
            "and these are not used; choose a judge (judge=reward_model) to use them",
            keys,
        )
    cfg = copy.deepcopy(cfg)
    cfg.judge = None
    return cfg


def check_world(t: Any, world_size: int) -> int:
    """Return gradient-accumulation steps so that batch = micro x accumulation x processes
    (`t`: the train section)."""
    batch, micro = t.batch_size, t.micro_batch_size
    per_step = micro * world_size
    if batch % per_step:
        fixes = [f"train.batch_size={max(per_step, batch // per_step * per_step)}"]
        if batch % world_size == 0:
            fixes.append(
                f"train.micro_batch_size={max(d for d in range(1, micro + 1) if (batch // world_size) % d == 0)}"
            )
        raise ConfigError(
            [
                f"train.batch_size={batch} must be a multiple of train.micro_batch_size x processes = "
                f"{micro} x {world_size}: set {' or '.join(fixes)}, or launch another number of processes"
            ]
        )
    return batch // per_step


def to_container(cfg: Config) -> dict[str, Any]:
    """The typed config as plain dicts (for W&B and the log file)."""
    return as_plain(cfg)
