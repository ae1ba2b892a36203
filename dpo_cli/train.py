"""`run(cfg)`: build everything from the config, then one training loop, top to bottom."""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dpo_cli import checkpoint, config
from dpo_cli.data.batching import micro_batches, position, step_indices, steps_per_epoch
from dpo_cli.data.chat import load_template
from dpo_cli.data.prepare import prepare
from dpo_cli.data.summary import report
from dpo_cli.data.tokenize import Tokenized, fingerprint
from dpo_cli.distributed import cpu_only, world_size_from_env
from dpo_cli.errors import ConfigError, DataError, UserError
from dpo_cli.evaluate import Averages, batch_loss, evaluate, make_batch
from dpo_cli.lora import apply_lora
from dpo_cli.losses import Loss
from dpo_cli.metrics import JsonlSink, MetricLogger, ProgressSink, WandbSink
from dpo_cli.modeling import check_max_length, count_parameters, load_model, load_tokenizer
from dpo_cli.reference import ModelReference, check_reference_tokenizer, live_reference, reference_model_config
from dpo_cli.report import write_report

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job (the current directory outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(os.getcwd())


def _open_sinks(
    cfg: DictConfig, run_dir: Path, accelerator: Any, n_steps: int, start: int, resumed: bool
) -> MetricLogger:
    if not accelerator.is_main_process:
        return MetricLogger([])
    sinks: list[Any] = [JsonlSink(run_dir / "metrics.jsonl", resume_step=start if resumed else None)]
    w = cfg.logger.wandb
    if w.mode != "disabled":
        sinks.append(WandbSink(w.mode, w.project, w.entity, w.name, w.group, w.tags, config.to_container(cfg), run_dir))
    if cfg.logger.progress:  # last: it takes over the console handlers until closed
        sinks.append(ProgressSink(total=n_steps, initial=start))
    return MetricLogger(sinks)


def _make_accelerator(t: DictConfig) -> Any:
    """The Accelerator for `train.mixed_precision`, or a ConfigError for what it cannot run."""
    from accelerate import Accelerator, DistributedType
    from accelerate.state import AcceleratorState

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no" and launcher != t.mixed_precision:
        log.warning(
            "accelerate launch asked for mixed precision %r; dpo-cli uses train.mixed_precision=%r",
            launcher,
            t.mixed_precision,
        )
    if world_size_from_env() == 1:
        # accelerate keeps its state for the whole process; the jobs of a Hydra sweep each
        # start from a clean one so that they may differ in precision or device.
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=cpu_only())
    except ValueError as e:  # e.g. bf16 on a GPU without bf16 support
        raise ConfigError([f"train.mixed_precision={t.mixed_precision}: {e}"]) from None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(
            f"{accelerator.distributed_type.value} launches are not supported yet: evaluation, "
            "the reference copy and checkpoints assume whole (DDP) models; use --multi_gpu"
        )
    return accelerator


def _resume_point(t: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, after refusing to mix a new run into an old run dir."""
    resume_from = checkpoint.resolve_resume(t.resume, run_dir)
    if resume_from is None and (run_dir / "metrics.jsonl").exists():
        how = (
            "train.resume=auto found no complete checkpoint there"
            if t.resume == "auto"
            else "continue it with train.resume=auto"
        )
        raise UserError(
            f"{run_dir} already holds a run (metrics.jsonl); {how}. Choose another hydra.run.dir, "
            "or delete that run directory to start it over"
        )
    return resume_from


def _warmup_steps(scheduler: DictConfig, n_steps: int) -> int:
    warmup = scheduler.warmup_steps
    if warmup is None:
        warmup = int(scheduler.warmup_ratio * n_steps)
    if warmup >= n_steps:
        raise ConfigError(
            [
                f"warmup takes {warmup} of the run's {n_steps} optimizer steps, so the learning rate "
                "never reaches optimizer.lr; lower scheduler.warmup_steps / scheduler.warmup_ratio "
                "or raise train.max_steps"
            ]
        )
    return warmup


@dataclass
class Run:
    """Everything the training loop needs, built from the config by `build`."""

    run_dir: Path
    accelerator: Any
    accum: int  # gradient-accumulation micro batches per optimizer step
    train_set: list[Tokenized]
    eval_set: list[Tokenized]
    per_epoch: int  # optimizer steps per pass over train_set
    n_steps: int
    run_shape: dict[str, Any]  # what a checkpoint must agree on to continue this run
    tokenizer: Any
    loss_fn: Loss
    policy: Any  # prepared by accelerate (DDP-wrapped under several processes)
    unwrapped: Any
    optimizer: Any
    scheduler: Any
    reference: Any  # a source of reference log-probs (dpo_cli.reference), or None
    eval_reference: Any  # the same for the eval set (a precomputed table is per dataset)
    start: int  # the optimizer step to start from (0, or the resumed checkpoint's)
    resumed: bool


def _load_data(cfg: DictConfig, tokenizer: Any) -> tuple[list[Tokenized], list[Tokenized], int, int]:
    """Tokenized train and eval examples, steps per epoch and the run's length."""
    t = cfg.train
    data = prepare(cfg.data, tokenizer, t.seed)
    log.info("data (the report mode=inspect prints):\n%s", report(data, tokenizer, t.batch_size))
    per_epoch = steps_per_epoch(len(data.train), t.batch_size)
    if per_epoch == 0:
        raise DataError(
            f"train.batch_size={t.batch_size} is larger than the {len(data.train)} training {data.unit}; lower it"
        )
    return data.train, data.eval, per_epoch, t.max_steps or t.epochs * per_epoch


def build(cfg: DictConfig) -> Run:
    """Validate the config, then build the run's parts: data before weights, so that a bad
    dataset fails before minutes of model loading; the resume point before any training."""
    from accelerate.utils import set_seed
    from hydra.utils import instantiate
    from transformers import get_scheduler

    config.validate(cfg)
    run_dir = run_dir_of(cfg)
    t = cfg.train
    accelerator = _make_accelerator(t)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # messages once, from the main process
    accum = config.check_world(cfg, accelerator.num_processes)
    resume_from = _resume_point(t, run_dir)
    set_seed(t.seed)
    log.info("run directory: %s", run_dir)
    log.info(
        "processes: %d | device: %s | mixed precision: %s | model dtype: %s | batch %d = micro %d x accumulation %d x processes %d",
        accelerator.num_processes,
        accelerator.device,
        t.mixed_precision,
        cfg.model.dtype,
        t.batch_size,
        t.micro_batch_size,
        accum,
        accelerator.num_processes,
    )
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))

    check_max_length(cfg.model, cfg.data.max_length)  # from the model's config, before data and weights
    tokenizer = load_tokenizer(cfg.model)
    if cfg.reference.name_or_path is not None:
        check_max_length(reference_model_config(cfg), cfg.data.max_length)
        check_reference_tokenizer(cfg, tokenizer)
    train_set, eval_set, per_epoch, n_steps = _load_data(cfg, tokenizer)
    warmup = _warmup_steps(cfg.scheduler, n_steps)
    run_shape = {"n_steps": n_steps, "data": fingerprint(train_set), **checkpoint.settings(cfg)}
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, run_shape)

    loss_fn = instantiate(cfg.loss)
    policy = load_model(cfg.model, tokenizer, t.seed)
    if cfg.model.lora.r is not None:
        policy = apply_lora(policy, cfg.model.lora, cfg.model.gradient_checkpointing)
    trainable, total = count_parameters(policy)
    log.info(
        "model: %s | %.2fM trainable / %.2fM parameters | loss: %r",
        type(policy).__name__,
        trainable / 1e6,
        total / 1e6,
        loss_fn,
    )
    optimizer = instantiate(cfg.optimizer)(params=[p for p in policy.parameters() if p.requires_grad])
    scheduler = get_scheduler(cfg.scheduler.name, optimizer, num_warmup_steps=warmup, num_training_steps=n_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    # The scheduler is stepped by hand once per optimizer step; registering it (instead of
    # preparing it) keeps it in checkpoints without accelerate stepping it once per process.
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(policy)
    # The reference comes from the policy before any update (or its own weights). On resume it
    # is rebuilt the same way (same weights or same seed); the checkpoint then overwrites only
    # the policy, the optimizer and the scheduler.
    reference, eval_reference = _reference(cfg, loss_fn, tokenizer, unwrapped, train_set, eval_set, accelerator)
    log.info("reference: %s", reference.describe() if reference else "none (no loss term needs one)")
    start = checkpoint.load(accelerator, resume_from)["step"] if resume_from is not None else 0
    return Run(
        run_dir, accelerator, accum, train_set, eval_set, per_epoch, n_steps, run_shape, tokenizer,
        loss_fn, policy, unwrapped, optimizer, scheduler, reference, eval_reference, start, resume_from is not None,
    )  # fmt: skip


def _reference(
    cfg: DictConfig,
    loss_fn: Loss,
    tokenizer: Any,
    policy: Any,
    train_set: list[Tokenized],
    eval_set: list[Tokenized],
    accelerator: Any,
) -> tuple[Any, Any]:
    """The reference sources for the train and eval sets: none when no loss term needs one,
    precomputed tables (reference.precompute), or one live model-backed source for both."""
    if not loss_fn.requires_reference:
        return None, None
    if cfg.reference.precompute:
        from dpo_cli.refcache import precompute

        refs = precompute(cfg, tokenizer, policy, {"train": train_set, "eval": eval_set}, accelerator)
        return refs["train"], refs["eval"]
    reference = live_reference(cfg, tokenizer, policy)
    if isinstance(reference, ModelReference):
        reference.model.to(accelerator.device)
    return reference, reference


def run(cfg: DictConfig) -> dict[str, float]:
    """Train the policy described by `cfg`; return the last train and eval metrics."""
    r = build(cfg)
    t = cfg.train
    accelerator, policy, loss_fn, reference = r.accelerator, r.policy, r.loss_fn, r.reference
    pad_id = r.tokenizer.pad_token_id
    last: dict[str, float] = {}

    def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
        # A batch statistic a loss uses (KTO's KL estimate): every process joins this reduce on
        # every micro batch, since all of them step through the same number of micro batches.
        return accelerator.reduce(x, "mean")

    with _open_sinks(cfg, r.run_dir, accelerator, r.n_steps, r.start, r.resumed) as metrics:

        def run_eval(step: int) -> None:
            if not r.eval_set:
                return
            row = {
                "step": step,
                **evaluate(r.unwrapped, r.eval_reference, loss_fn, r.eval_set, accelerator, t.micro_batch_size, pad_id),
            }
            metrics.log(row)
            last.update(row)
            log.info("eval step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "step"))

        # Metrics, tokens and time accumulate over the logging window (logger.log_every steps).
        window = Averages()
        window_tokens = torch.zeros((), device=accelerator.device)
        window_steps, window_start = 0, time.perf_counter()
        policy.train()
        for step in range(r.start, r.n_steps):
            indices = step_indices(step, len(r.train_set), t.batch_size, t.seed)
            shards = micro_batches(indices, accelerator.process_index, accelerator.num_processes, t.micro_batch_size)
            for i, idx in enumerate(shards):
                batch = make_batch(r.train_set, idx, pad_id, loss_fn, accelerator.device)
                # Gradients are all-reduced across processes only on the last micro batch.
                sync = i == len(shards) - 1
                with nullcontext() if sync else accelerator.no_sync(policy), accelerator.autocast():
                    loss, parts = batch_loss(policy, reference, loss_fn, batch, mean_over_processes)
                    # Each micro batch's loss is a mean over its pairs; dividing by the number of
                    # micro batches makes the accumulated gradient the mean over this process's
                    # share, and DDP's all-reduce then averages over processes.
                    accelerator.backward(loss / r.accum)
                window.add(parts)
                window_tokens += batch["attention_mask"].sum()
            max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
            grad_norm = accelerator.clip_grad_norm_(policy.parameters(), max_norm)
            lr = r.scheduler.get_last_lr()[0]
            r.optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
                r.scheduler.step()
            r.optimizer.zero_grad(set_to_none=True)
            window_steps += 1

            done = step + 1
            if done % cfg.logger.log_every == 0 or done == r.n_steps:
                elapsed = time.perf_counter() - window_start
                row = {
                    "step": done,
                    "epoch": round(done / r.per_epoch, 4),
                    **window.reduce(accelerator),
                    "grad_norm": float(grad_norm),
                    "lr": lr,
                    "tokens_per_s": accelerator.reduce(window_tokens, "sum").item() / elapsed,
                    "pairs_per_s": t.batch_size * window_steps / elapsed,
                }
                metrics.log(row)
                last.update(row)
                window.clear()
                window_tokens.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if (t.eval_every and done % t.eval_every == 0) or done == r.n_steps:
                run_eval(done)  # before the checkpoint, so that a resume never repeats it
            if t.save_every and done % t.save_every == 0:
                epoch, batch_in_epoch = position(done, len(r.train_set), t.batch_size)
                state = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, **r.run_shape}
                checkpoint.save(accelerator, r.run_dir, done, state, t.keep_checkpoints)

    if r.start == r.n_steps:
        log.info("the run had already finished at step %d; nothing left to train", r.n_steps)
    if cfg.data.chat_template:  # the template the data was rendered with travels with the model
        r.tokenizer.chat_template = load_template(cfg.data.chat_template)
    checkpoint.save_final(accelerator, policy, r.tokenizer, r.run_dir / "final", cfg.export.merge_lora)
    if accelerator.is_main_process:
        write_report(r.run_dir / "metrics.jsonl", r.run_dir / "report.png")
    evals = " ".join(f"{k}={v:.4f}" for k, v in last.items() if k.startswith("eval_"))
    log.info("done: %d steps; final model in %s; %s", r.n_steps, r.run_dir / "final", evals)
    accelerator.end_training()  # tears down the process group so processes exit cleanly
    return last
