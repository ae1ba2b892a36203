"""`mode=inspect`: the preflight. Validates the config, loads the tokenizer (no model weights)
and the data, and reports what the data becomes and how much memory training will need,
before a GPU hour is spent on it."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from dpo_cli import config, layout, memory
from dpo_cli.data.prepare import check_prepared, prepare
from dpo_cli.data.summary import export, report
from dpo_cli.errors import ConfigError, DataError
from dpo_cli.modeling import check_max_length, load_tokenizer

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> str:
    """The data report and the memory estimate for the same overrides as a training run;
    returns them (and logs them). Data that training would refuse (mostly degenerate pairs) is
    reported, with the reason, rather than raised, so that the report shows what to fix; so is
    an estimate beyond the device's memory (a WARNING line)."""
    config.validate(cfg)
    check_max_length(cfg.model, cfg.data.max_length)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.train.seed, check=False, need_text=bool(cfg.inspect.export))
    text = report(data, tokenizer, cfg.train.batch_size, cfg.inspect.examples)
    try:
        check_prepared(data)
        if len(data.train) < cfg.train.batch_size:
            raise DataError(
                f"train.batch_size={cfg.train.batch_size} is larger than the {len(data.train)} training {data.unit}; lower it"
            )
    except DataError as e:
        text += f"\ntraining would refuse this data: {e}"
    if cfg.inspect.export:
        path = export(data, cfg.inspect.export)
        text += f"\nnormalized {data.unit} written to {path}"
    # Built from the models' configs on the meta device: no weights are read.
    text += "\n\n" + batches(cfg, tokenizer)
    text += "\n\n" + generation(cfg, tokenizer, data.eval_pairs)
    text += "\n\n" + memory.estimate(cfg, tokenizer, instantiate(cfg.loss)).report()
    log.info("preflight report (mode=inspect; no model weights loaded):\n%s", text)
    return text


def generation(cfg: DictConfig, tokenizer: Any, eval_pairs: list[dict]) -> str:
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
    if problem:
        lines.append(f"  training would refuse this: {problem}")
    return "\n".join(lines)


def batches(cfg: DictConfig, tokenizer: Any) -> str:
    """Which layout and LM-head path training will use, and why (from the model's config on
    the meta device; training checks them against the plain path on real examples at start)."""
    m = cfg.model
    config = memory.model_config(m, tokenizer)
    if m.attn_implementation is not None:
        config._attn_implementation = m.attn_implementation
    model = memory.meta_model(
        config, memory.resolve_dtype(m.dtype, config), m.trust_remote_code and m.random_init is None
    )
    try:
        choice = layout.choose(cfg.train.layout, cfg.train.logits_chunk, model, sharded=False)
    except ConfigError as e:
        return f"batches: training would refuse this: {e}"
    return (
        f"batches: {choice.describe()}\n  (on one process, without FSDP/ZeRO-3; checked against padded rows with full "
        "logits on real examples when training starts)"
    )
