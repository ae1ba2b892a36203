"""`mode=inspect`: the preflight. Validates the config, loads the tokenizer (no model weights)
and the data, reports what the data becomes and how much memory training will need, and runs
the checks training runs before its first step (exit 2 if training would refuse the run),
before a GPU hour is spent on it."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from hydra.utils import instantiate

from dpo_cli import config, harness, layout, memory, roundconfig, tasks
from dpo_cli.data.batching import steps_per_epoch
from dpo_cli.data.prepare import Prepared, check_prepared, prepare
from dpo_cli.data.summary import export, report
from dpo_cli.distributed import cpu_only, world_size_from_env
from dpo_cli.errors import ConfigError, DataError, UserError
from dpo_cli.lora import check_targets
from dpo_cli.modeling import check_max_length, load_tokenizer, resolve_attention
from dpo_cli.modeling.options import ModelConfig
from dpo_cli.reference import check_reference_tokenizer, reference_model_config
from dpo_cli.reward import check_margins
from dpo_cli.schedule import warmup_steps
from dpo_cli.schema import Config

log = logging.getLogger(__name__)


REFUSED = re.compile(r"training would refuse this(?: data)?: (.*)")


def run(cfg: Config) -> str:
    """The data report and the memory estimate for the same overrides as a training run;
    returns them (and logs them). Every check training runs before its first step runs here
    too (those that need weights on the meta device instead): what it would refuse once the
    data is read is reported in place, with the reason, so that the report shows what to fix,
    and then raised as one UserError listing all of it (exit 2: never an OK for a run that
    would not start). Problems found before the data (the config, the model's and reference's
    files) are raised at once, as training raises them. An estimate beyond the device's memory
    is a WARNING line, not a refusal."""
    config.check_world(cfg.train, world_size_from_env())
    check_max_length(cfg.model, cfg.data.max_length)
    tokenizer = load_tokenizer(cfg.model)
    if cfg.reference.name_or_path is not None:
        check_max_length(reference_model_config(cfg), cfg.data.max_length)
        check_reference_tokenizer(cfg, tokenizer)
    data = prepare(cfg.data, tokenizer, cfg.train.seed, check=False, need_text=bool(cfg.inspect.export))
    text = report(data, tokenizer, cfg.train.batch_size, cfg.inspect.examples)
    problem = data_problem(cfg, data)
    if problem:
        text += f"\ntraining would refuse this data: {problem}"
    if cfg.inspect.export:
        path = export(data, cfg.inspect.export, cfg.inspect.overwrite)
        text += f"\nnormalized {data.unit} written to {path}"
    # Built from the models' configs on the meta device: no weights are read.
    text += "\n\n" + structure(cfg.model, tokenizer)
    text += "\n\n" + batches(cfg, tokenizer)
    text += "\n\n" + generation(cfg, tokenizer, data.eval_pairs) + "\n" + harness.plan(cfg.eval.harness)
    if cfg.task == "iterative":
        prompts = len({tuple(example["prompt_ids"]) for example in data.train})
        text += "\n\n" + roundconfig.plan(cfg, prompts, instantiate(cfg.judge).describe())
    text += "\n\n" + memory.estimate(cfg, tokenizer, tasks.of(cfg).objective(cfg)).report()
    log.info("preflight report (mode=inspect; no model weights loaded):\n%s", text)
    problems = refusals(text)
    if problems:
        lines = "".join(f"\n  - {p}" for p in problems)
        n = len(problems)
        raise UserError(f"mode=inspect: training would refuse this run ({n} problem{'s' if n > 1 else ''}):{lines}")
    return text


def refusals(text: str) -> list[str]:
    """The problems a report says training would refuse: each 'training would refuse this: X'
    line (from any section), with the '  - ' lines of a list that follows it."""
    found: list[str] = []
    listing = False
    for line in text.splitlines():
        marked = REFUSED.search(line)
        if marked:
            found.append(marked.group(1))
            listing = marked.group(1).endswith(":")
        elif listing and line.startswith("  - "):
            found[-1] += " " + line[4:]
        else:
            listing = False
    return found


def data_problem(cfg: Config, data: Prepared) -> str | None:
    """What training refuses once the data is read: mostly degenerate pairs, a batch larger
    than the training set, a warmup as long as the run (its length known from the data when
    train.max_steps is unset)."""
    t = cfg.train
    try:
        check_prepared(data)
        check_margins(tasks.of(cfg).objective(cfg), data.train, data.eval)
    except DataError as e:
        return str(e)
    per_epoch = steps_per_epoch(len(data.train), t.batch_size)
    if per_epoch == 0:
        return f"train.batch_size={t.batch_size} is larger than the {len(data.train)} training {data.unit}; lower it"
    try:
        warmup_steps(cfg.scheduler.warmup_steps, cfg.scheduler.warmup_ratio, t.max_steps or t.epochs * per_epoch)
    except ConfigError as e:
        return "; ".join(e.problems)
    return None


def structure(m: ModelConfig, tokenizer: Any) -> str:
    """What training checks of the policy's structure (LoRA's target modules, gradient
    checkpointing), on the meta device: training checks the first before the weights load
    (`lora.check_targets`), the second as they load."""
    problems = []
    try:
        check_targets(m, tokenizer)
    except ConfigError as e:
        problems += e.problems
    if m.gradient_checkpointing:
        arch = memory.model_config(m, tokenizer)
        meta = memory.meta_model(arch, torch.float32, m.trust_remote_code and m.random_init is None)
        if not meta.supports_gradient_checkpointing:
            problems.append(
                f"model.gradient_checkpointing=true: {type(meta).__name__} does not support gradient checkpointing; "
                "set model.gradient_checkpointing=false"
            )
    checkpointing = ", gradient checkpointing" if m.gradient_checkpointing else ""
    return "\n".join(
        [f"model: {_training(m)}{checkpointing}", *(f"  training would refuse this: {p}" for p in problems)]
    )


def _training(m: ModelConfig) -> str:
    """What trains: every weight, or LoRA with its options, over a quantized base when asked."""
    if m.lora.r is None:
        return "full fine-tuning"
    lora, q = m.lora, m.quantization
    options = [
        ("DoRA", lora.use_dora),
        ("rsLoRA", lora.rslora),
        (f"trained whole: {lora.modules_to_save}", lora.modules_to_save),
    ]
    text = f"LoRA r={lora.r} on {lora.target_modules}" + "".join(f", {name}" for name, on in options if on)
    if q.bits == 4:
        text += f", 4-bit {q.quant_type} base{' (double quant)' if q.double_quant else ''}"
    elif q.bits == 8:
        text += ", 8-bit base"
    return text


def generation(cfg: Config, tokenizer: Any, eval_pairs: list[dict]) -> str:
    """What generation evaluation will do: the judge (built, not loaded), the prompts, when."""
    from dpo_cli.evalgen import eval_prompts

    e = cfg.eval
    if cfg.judge is None or e.prompts == 0:
        return "generation evaluation: off (no judge; choose one with judge=..., see README, Evaluation)"
    judge = instantiate(cfg.judge)
    prompts = eval_prompts(eval_pairs, tokenizer, cfg.data, e.prompts)
    problem = judge.check([p.prompt for p in prompts]) if hasattr(judge, "check") else None
    when = f"every {e.generate_every} steps and at the end" if e.generate_every else "at the end"
    decoding = "greedy" if e.temperature == 0 else f"temperature {e.temperature}, top-p {e.top_p}"
    lines = [
        f"generation evaluation: {len(prompts)} held-out prompts, {when}; judge {judge.describe()}",
        f"  up to {e.max_new_tokens} new tokens, {decoding}, seed {e.seed}, {e.batch_size} prompts per batch",
    ]
    if not prompts:  # as evalgen.setup refuses it
        problem = "the eval split has no prompts to generate responses for"
    if problem:
        lines.append(f"  training would refuse this: judge: {problem}")
    return "\n".join(lines)


def batches(cfg: Config, tokenizer: Any) -> str:
    """Which layout and LM-head path training will use, and why (from the model's config on
    the meta device; training checks them against the plain path on real examples at start)."""
    task = tasks.of(cfg)
    if task.layout is not None:
        return f"batches: layout {task.layout}: {task.layout_why}"
    m = cfg.model
    config = memory.model_config(m, tokenizer)
    attention = resolve_attention(config, m.attn_implementation)  # null: the best the model supports, as loading picks
    if attention is not None:
        config._attn_implementation = attention
    model = memory.meta_model(
        config, memory.resolve_dtype(m.dtype, config), m.trust_remote_code and m.random_init is None
    )
    try:
        auto_attention, cuda = m.attn_implementation is None, not cpu_only()  # training runs here: its device
        choice = layout.choose(cfg.train.layout, cfg.train.logits_chunk, model, False, auto_attention, cuda)
    except ConfigError as e:
        return f"batches: training would refuse this: {e}"
    return (
        f"batches: {choice.describe()}\n  (on one process, without FSDP/ZeRO-3; checked against padded rows with full "
        "logits on real examples when training starts)"
    )
