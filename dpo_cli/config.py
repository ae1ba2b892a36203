"""Whole-config validation: every problem at once, before any weights load.

The schema (`dpo_cli.schema`) makes an unknown key or a wrongly typed value fail when Hydra
composes the config. `validate` then checks what types cannot express (ranges, cross-field
rules, that a `_target_` exists and accepts the given keys) and reports every problem at once,
before any weights are loaded. It reads every part's options (data formats, losses, models,
layouts), so it sits above them: no part imports this module.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import os
import typing
from collections.abc import Callable
from dataclasses import is_dataclass
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dpo_cli import schedule
from dpo_cli.batch import KL_ROWS, LAYOUTS
from dpo_cli.data.options import data_problems, input_files
from dpo_cli.data.options import unpaired as unpaired_data
from dpo_cli.distributed import cpu_only
from dpo_cli.errors import ConfigError
from dpo_cli.losses.combination import check_weights
from dpo_cli.modeling import attention_problem, max_positions, position_problem

# The schema's names that callers have found here (`config.register_configs`, ...) are re-exported (`as`).
from dpo_cli.schema import Config, import_target
from dpo_cli.schema import DataConfig as DataConfig
from dpo_cli.schema import register_configs as register_configs

MODES = ("train", "inspect", "eval")
PRECISIONS = ("no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
MODEL_DTYPES = (*DTYPES, "auto")  # auto: the dtype the checkpoint's config names
WANDB_MODES = ("online", "offline", "disabled")
TRUNCATION_MODES = ("keep_end", "keep_start")
SCHEDULERS = schedule.NAMES


def _choice(problems: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r} is not one of {', '.join(allowed)}; set {key}=<one of them>")


def _positive(problems: list[str], key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        problems.append(f"{key}={value!r} must be > 0")


def _numeric_hint(target: Callable[..., Any], name: str) -> bool:
    """Whether parameter `name` is annotated as a number (float, int, float | None, ...)."""
    try:
        hint = typing.get_type_hints(target).get(name)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no check
        return False
    args = typing.get_args(hint) or (hint,)
    return any(a in (int, float) for a in args)


def _check_target(problems: list[str], key: str, node: Any, group: str | None = None) -> None:
    """Check that `node._target_` imports and accepts every other key, with values of the
    same kind as the parameter's default (a number where the default is a number) or, for a
    None default, its annotation (a number where it says float | None)."""
    if not isinstance(node, (dict, DictConfig)) or "_target_" not in node:
        problems.append(f"{key} must be a mapping with a _target_ (see conf/{group or key}/)")
        return
    try:
        target = import_target(str(node["_target_"]))
    except (ImportError, AttributeError, ValueError):
        problems.append(f"{key}._target_={node['_target_']!r} cannot be imported; check the dotted path")
        return
    params = inspect.signature(target).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, value in node.items():
        if name in ("_target_", "_partial_"):
            continue
        if name not in params:
            if not takes_kwargs:
                allowed = ", ".join(p for p in params if p not in ("self", "params"))
                problems.append(f"{key}.{name} is not a parameter of {node['_target_']}; allowed: {allowed}")
            continue
        default = params[name].default
        if isinstance(default, bool):
            ok, expected = isinstance(value, bool), f"a bool like the default {default!r}"
        elif isinstance(default, numbers.Real) or (
            default is None
            and value is not None
            and _numeric_hint(target.__init__ if inspect.isclass(target) else target, name)
        ):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            expected = "a number or null" if default is None else f"a number like the default {default!r}"
        else:
            ok, expected = True, ""
        if not ok:
            problems.append(f"{key}.{name}={value!r} has the wrong type; expected {expected}")


def _check_random_init(arch: Any, max_length: Any = None) -> list[str]:
    """Problems with model.random_init: its model_type and kwargs must build a transformers config."""
    arch = dict(arch)
    if "model_type" not in arch:
        return ["model.random_init needs a model_type (e.g. llama, gpt2, qwen2)"]
    from transformers import CONFIG_MAPPING, AutoConfig  # here: transformers takes seconds to import (CLI start-up)

    model_type = arch.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        return [
            f"model.random_init.model_type={model_type!r} is not a transformers model type (e.g. llama, gpt2, qwen2, mistral)"
        ]
    try:
        built = AutoConfig.for_model(model_type, **arch)
    except Exception as e:  # noqa: BLE001 - config classes raise their own validation errors
        cause = e.__cause__ or e
        first = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        return [f"model.random_init does not build a transformers config: {first[:300]}"]
    # Config classes keep unknown kwargs as plain attributes (a typo would pass silently);
    # known ones are either in the defaults or consumed (e.g. rope_theta into rope_parameters).
    known = CONFIG_MAPPING[model_type]().to_dict()
    unknown = sorted(k for k in arch if k not in known and k in vars(built))
    problems = [f"model.random_init.{k} is not a {model_type} config key; check the spelling" for k in unknown]
    limit = max_positions(built)
    if limit is not None and isinstance(max_length, int) and max_length > limit:
        problems.append(position_problem(max_length, limit))
    return problems


def _build(problems: list[str], key: str, node: Any, group: str) -> Any:
    """Instantiate a well-formed `_target_` node; the object checks its own value ranges (e.g.
    beta > 0) and each line of its ValueError becomes a problem prefixed with `key`."""
    n_problems = len(problems)
    _check_target(problems, key, node, group)
    if len(problems) > n_problems:
        return None
    if group == "loss":
        problems.extend(_unset_parameters(key, node))
    try:
        return instantiate(node)
    except Exception as e:  # noqa: BLE001 - any construction failure is a config problem
        cause = e.__cause__ or e
        problems.extend(f"{key}.{line}" for line in str(cause).splitlines())
        return None


def _unset_parameters(key: str, node: Any) -> list[str]:
    """A problem for each parameter of a loss that its node does not set: the class default
    would apply without a word (`~loss.beta` deletes the key; every conf/loss file sets every
    parameter, so that the run's recorded config says what it trained with)."""
    target = import_target(str(node["_target_"]))
    problems = []
    for name, param in inspect.signature(target).parameters.items():
        if name in node or param.default is inspect.Parameter.empty:  # no default: instantiate says so
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        value = OmegaConf.to_yaml({"v": param.default}).strip().removeprefix("v: ")  # as an override spells it
        problems.append(
            f"{key}.{name} is not set, so the loss would use {target.__name__}'s default {value} without a word; "
            f"set {key}.{name}={value} to train with it"
        )
    return problems


def _loss_class(node: Any) -> Any:
    """The class a loss node names, for its capability flags when it could not be built."""
    try:
        return import_target(str(node["_target_"]))
    except Exception:  # noqa: BLE001 - already reported by _check_target
        return None


def _check_loss(problems: list[str], node: Any, unpaired: bool, micro_batch_size: int) -> dict[str, Any]:
    """The loss (each term of a combination on its own, so that a problem names its term's
    key), then what it needs of the data: pairs, and two examples per micro batch for KTO.
    A loss that does not build still has its data needs checked, from its class. Returns the
    terms (objects, or classes for terms that did not build) by name."""
    if isinstance(node, DictConfig) and "terms" in node:
        nodes = dict(node.terms) if isinstance(node.terms, DictConfig) else {}
        terms = {name: _build(problems, f"loss.terms.{name}", n, "loss") for name, n in nodes.items()}
        if all(t is not None for t in terms.values()):
            _build(problems, "loss", node, "loss")  # the combination's own checks (weights, ...)
        else:
            weights = node.get("weights") or {}
            problems.extend(f"loss.{p}" for p in check_weights(list(nodes), dict(weights)))
        parts = {name: t if t is not None else _loss_class(nodes[name]) for name, t in terms.items()}
    else:
        loss = _build(problems, "loss", node, "loss")
        parts = {"": loss if loss is not None else _loss_class(node)}
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
    return parts


def _check_model(p: list[str], m: Any, max_length: Any) -> None:
    if m.name_or_path is not None and m.random_init is not None:
        p.append(
            f"model.name_or_path={m.name_or_path!r} and model.random_init are both set: the model group "
            "(model=tiny, the default) builds a random model from model.random_init; to train "
            f"{m.name_or_path!r}, use model=pretrained model.name_or_path={m.name_or_path}"
        )
    elif m.name_or_path is None and m.random_init is None:
        p.append(
            "set model.name_or_path (pretrained weights: model=pretrained model.name_or_path=DIR_OR_HUB_ID) "
            "or model.random_init (an architecture to initialise randomly, e.g. model=tiny)"
        )
    if m.random_init is not None:
        p.extend(_check_random_init(m.random_init, max_length))
    if m.gguf_file is not None and m.name_or_path is None:
        p.append("model.gguf_file needs model.name_or_path (the directory or hub id holding the file)")
    _choice(p, "model.dtype", m.dtype, MODEL_DTYPES)
    attention = attention_problem(m.attn_implementation)
    if attention:
        p.append(attention)
    _check_lora(p, m.lora)


def _check_lora(p: list[str], lora: Any) -> None:
    if lora.r is None:
        return
    _positive(p, "model.lora.r", lora.r)
    _positive(p, "model.lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        p.append(f"model.lora.dropout={lora.dropout} must be in [0, 1)")
    tm = lora.target_modules
    if not (isinstance(tm, str) or (OmegaConf.is_list(tm) and len(tm) and all(isinstance(x, str) for x in tm))):
        p.append(
            f"model.lora.target_modules={tm!r} must be all-linear or a list of module names, "
            "e.g. model.lora.target_modules=[q_proj,v_proj]"
        )


def _check_reference(p: list[str], cfg: DictConfig, needs_reference: bool, kl_rows: bool) -> None:
    """The reference section against the loss: a reference-free loss loads none, so reference
    settings would be ignored (said, not silently); KTO's KL rows mix examples per batch, so
    their reference log-probs cannot be looked up per example."""
    r = cfg.reference
    if r.dtype is not None:
        _choice(p, "reference.dtype", r.dtype, MODEL_DTYPES)
    if r.dtype not in (None, cfg.model.dtype) and r.name_or_path is None and cfg.model.lora.r is not None:
        p.append(
            f"reference.dtype={r.dtype} with LoRA: the reference is the policy's own base weights (adapter "
            "disabled), which are in model.dtype; remove reference.dtype, or set reference.name_or_path"
        )
    if r.gguf_file is not None and r.name_or_path is None:
        p.append("reference.gguf_file needs reference.name_or_path (the directory or hub id holding the file)")
    if r.precompute and kl_rows:
        p.append(
            "reference.precompute=true with a loss that uses KTO's KL rows: those rows pair prompts with other "
            "examples' completions batch by batch, so their reference log-probs cannot be cached per example; "
            "set reference.precompute=false (the reference model then runs live)"
        )
    if not needs_reference:
        set_keys = [
            k for k in ("name_or_path", "revision", "gguf_file", "dtype", "precompute") if r[k] not in (None, False)
        ]
        if set_keys:
            p.append(
                f"{', '.join(f'reference.{k}={r[k]!r}' for k in set_keys)}: no term of the loss needs a reference "
                "model (reference-free loss), so no reference is loaded and these would be ignored; remove them"
            )


def _check_data(p: list[str], d: Any) -> None:
    """The data section's own checks (`dpo_cli.data.options.data_problems`), on its typed form."""
    p.extend(data_problems(OmegaConf.to_object(d)))


def _check_optimization(p: list[str], cfg: DictConfig) -> None:
    """optimizer, scheduler and train sections (they constrain each other)."""
    _check_target(p, "optimizer", cfg.optimizer, "optimizer")
    if isinstance(cfg.optimizer, DictConfig):
        if not cfg.optimizer.get("_partial_", False):
            p.append("optimizer._partial_ must be true: the parameters are passed at run time")
        lr = cfg.optimizer.get("lr")
        if isinstance(lr, numbers.Real) and lr <= 0:
            p.append(f"optimizer.lr={lr} must be > 0")

    s = cfg.scheduler
    _choice(p, "scheduler.name", s.name, SCHEDULERS)
    if s.warmup_steps is not None and s.warmup_steps < 0:
        p.append(f"scheduler.warmup_steps={s.warmup_steps} must be >= 0")
    if not 0 <= s.warmup_ratio < 1:
        p.append(f"scheduler.warmup_ratio={s.warmup_ratio} must be in [0, 1)")

    t = cfg.train
    _positive(p, "train.batch_size", t.batch_size)
    _positive(p, "train.micro_batch_size", t.micro_batch_size)
    if t.batch_size > 0 and t.micro_batch_size > 0 and t.batch_size % t.micro_batch_size:
        p.append(
            f"train.batch_size={t.batch_size} must be a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} (x the number of processes)"
        )
    _positive(p, "train.max_steps", t.max_steps, allow_none=True)
    _positive(p, "train.epochs", t.epochs)
    _positive(p, "train.eval_every", t.eval_every, allow_none=True)
    _positive(p, "train.save_every", t.save_every, allow_none=True)
    _positive(p, "train.keep_checkpoints", t.keep_checkpoints, allow_none=True)
    if t.max_steps and s.warmup_steps is not None and s.warmup_steps >= t.max_steps:
        p.append(
            f"scheduler.warmup_steps={s.warmup_steps} is not below train.max_steps={t.max_steps}: "
            "the learning rate would never reach optimizer.lr"
        )
    _positive(p, "train.max_grad_norm", t.max_grad_norm, allow_none=True)
    _positive(p, "train.max_nonfinite_steps", t.max_nonfinite_steps, allow_none=True)
    _choice(p, "train.mixed_precision", t.mixed_precision, PRECISIONS)
    _choice(p, "train.layout", t.layout, ("auto", *LAYOUTS))  # auto: dpo_cli.layout.choose
    _positive(p, "train.logits_chunk", t.logits_chunk, allow_none=True)
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


def _check_logger(p: list[str], lg: Any, save_every: int | None) -> None:
    _positive(p, "logger.log_every", lg.log_every)
    _positive(p, "logger.peak_tflops", lg.peak_tflops, allow_none=True)
    if save_every and lg.log_every and lg.log_every > 0 and save_every % lg.log_every:
        p.append(
            f"train.save_every={save_every} must be a multiple of logger.log_every={lg.log_every}, so that "
            "a resumed run logs the same averaged rows as an uninterrupted one"
        )
    _choice(p, "logger.wandb.mode", lg.wandb.mode, WANDB_MODES)


def _check_eval(p: list[str], cfg: DictConfig) -> None:
    """The judge (a `_target_` built here, loading nothing), generation settings and warm start."""
    e, ws = cfg.eval, cfg.model.warm_start
    if cfg.judge is not None:
        _build(p, "judge", cfg.judge, "judge")
    elif e.generate_every is not None:
        p.append(
            f"eval.generate_every={e.generate_every} needs a judge to compare the policy's responses with the "
            "reference's: choose one (judge=reward_model judge.name_or_path=..., or judge=sort for data=synthetic), "
            "or remove eval.generate_every"
        )
    _positive(p, "eval.generate_every", e.generate_every, allow_none=True)
    for key in ("max_new_tokens", "batch_size"):
        _positive(p, f"eval.{key}", e[key])
    if e.prompts < 0:
        p.append(f"eval.prompts={e.prompts} must be >= 0 (0 = no generation evaluation)")
    if e.temperature < 0:
        p.append(f"eval.temperature={e.temperature} must be >= 0 (0 = greedy decoding)")
    if not 0 < e.top_p <= 1:
        p.append(f"eval.top_p={e.top_p} must be in (0, 1]")
    if not 0 < e.confidence < 1:
        p.append(f"eval.confidence={e.confidence} must be in (0, 1), e.g. 0.95")
    if ws.steps < 0:
        p.append(f"model.warm_start.steps={ws.steps} must be >= 0 (0 = no warm start)")
    if ws.steps:
        _positive(p, "model.warm_start.lr", ws.lr)
        _positive(p, "model.warm_start.batch_size", ws.batch_size)
        _choice(p, "model.warm_start.responses", ws.responses, ("both", "chosen"))
        if cfg.model.lora.r is not None and cfg.model.name_or_path is not None:
            # A random-init base is saved with the adapter (final/base): its warm start travels with it.
            p.append(
                "model.warm_start fine-tunes every weight of model.name_or_path before LoRA training, and the "
                "adapter saved would name the untouched model as its base: set model.warm_start.steps=0, or train "
                "the SFT model first (loss=sft) and start from it"
            )


def _export_inputs(data: DictConfig) -> dict[str, str]:
    """The local files a data config reads (key -> path): an export must never replace one."""
    return input_files(OmegaConf.to_object(data))


def _check_export(p: list[str], cfg: DictConfig) -> None:
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
    for key, path in _export_inputs(cfg.data).items():
        source = os.path.realpath(os.path.expanduser(path))
        if out == source or out.startswith(source.rstrip(os.sep) + os.sep):
            p.append(f"inspect.export={export!r} is the input ({key}); write the export to another file")
            return
    if os.path.exists(out) and not cfg.inspect.overwrite:
        p.append(f"inspect.export={export!r} already exists; choose another file, or set inspect.overwrite=true")


def validate(cfg: DictConfig) -> None:
    """Check the whole composed config; raise one ConfigError listing every problem found.
    Each section checks itself; the loss is built here so that its own range checks run."""

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError([f"{k} is required (it is ??? in the config); set {k}=<value>" for k in missing])
    p: list[str] = []
    p.extend(unknown_keys(cfg) + _seed_problems(cfg.train.seed))
    _choice(p, "mode", cfg.mode, MODES)
    if cfg.inspect.examples < 0:
        p.append(f"inspect.examples={cfg.inspect.examples} must be >= 0")
    _check_export(p, cfg)
    _check_model(p, cfg.model, cfg.data.max_length)
    _check_data(p, cfg.data)
    unpaired = unpaired_data(OmegaConf.to_object(cfg.data))
    terms = _check_loss(p, cfg.loss, unpaired=unpaired, micro_batch_size=cfg.train.micro_batch_size)
    needs_reference = any(getattr(t, "requires_reference", True) for t in terms.values()) or not terms
    _check_reference(p, cfg, needs_reference, any(KL_ROWS in getattr(t, "needs", ()) for t in terms.values()))
    if cfg.export.merge_lora and cfg.model.lora.r is None:
        p.append("export.merge_lora=true needs LoRA (model.lora.r); a full fine-tune already exports the whole model")
    _check_optimization(p, cfg)
    _check_logger(p, cfg.logger, cfg.train.save_every)
    _check_eval(p, cfg)
    if p:
        raise ConfigError(p)


def check_world(cfg: DictConfig, world_size: int) -> int:
    """Return gradient-accumulation steps so that batch = micro x accumulation x processes."""
    batch, micro = cfg.train.batch_size, cfg.train.micro_batch_size
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
    return cfg.train.batch_size // per_step


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# --- keys the schema does not define; train.seed's range -----------------------------------------

SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit (set_seed seeds numpy, random and torch)


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


def _seed_problems(seed: Any) -> list[str]:
    if isinstance(seed, int) and not 0 <= seed <= SEED_MAX:
        return [f"train.seed={seed} must be in [0, 2**32 - 1] (numpy's seed range); set e.g. train.seed=42"]
    return []
