"""`build(cfg) -> Run`: the run's parts (dpo_cli.parts) from the config, in the order that fails
fast: the config, the launch and the run directory first, then the data, then the weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpo_cli import checkpoint, config, evalgen, layout, rundir, slurm, tasks, tracking
from dpo_cli.compiling import compile_layers
from dpo_cli.data.batching import steps_per_epoch
from dpo_cli.data.prepare import prepare
from dpo_cli.data.summary import report
from dpo_cli.data.tokenize import Tokenized, example_length, fingerprint
from dpo_cli.distributed import cpu_only, sharded, world_size_from_env
from dpo_cli.errors import ConfigError, DataError, UserError
from dpo_cli.guard import Guard
from dpo_cli.launch import accumulation_plugin, check_environment, configure_deepspeed
from dpo_cli.lora import apply_lora, check_targets
from dpo_cli.losses import Loss
from dpo_cli.metrics import JsonlSink, MetricLogger, ProgressSink, WandbSink, resolve_wandb_mode
from dpo_cli.modeling import check_max_length, count_parameters, load_model, load_tokenizer, quantized
from dpo_cli.modeling.quantize import is_quantized, trainable_checkpoints
from dpo_cli.optimizers import sync_offloaded
from dpo_cli.parts import Cadence, Checkpointer, Data, Models, Optimization, Outputs, Run
from dpo_cli.reference import (
    ModelReference,
    check_reference_tokenizer,
    live_reference,
    place_reference,
    reference_model_config,
)
from dpo_cli.reward import check_margins
from dpo_cli.schedule import make_scheduler, warmup_steps
from dpo_cli.schema import Config, TrainConfig, as_plain
from dpo_cli.signals import StopOnSignal
from dpo_cli.throughput import flops_per_token
from dpo_cli.warmstart import warm_started

log = logging.getLogger(__name__)


def build(cfg: Config, run_dir: Path, held: ExitStack, stop: StopOnSignal) -> Run:
    """Build the run's parts from the validated, typed config: data before weights, so that a bad
    dataset fails before minutes of model loading; the resume point before any training.
    The run directory's lock joins `held`, which the caller keeps until the run ends; `stop`
    ends the warm start early on a signal."""

    accelerator, resume_from, wandb_mode = _start(cfg, run_dir, held)
    check_max_length(cfg.model, cfg.data.max_length)  # from the model's config, before data and weights
    tokenizer = load_tokenizer(cfg.model)
    if cfg.reference.name_or_path is not None:
        check_max_length(reference_model_config(cfg), cfg.data.max_length)
        check_reference_tokenizer(cfg, tokenizer)
    data, eval_pairs, n_steps = _data(cfg, tokenizer)
    warmup = warmup_steps(cfg.scheduler.warmup_steps, cfg.scheduler.warmup_ratio, n_steps)
    run_shape = {"n_steps": n_steps, "data": fingerprint(data.train), **checkpoint.settings(cfg)}
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, run_shape)

    task = tasks.of(cfg)
    loss_fn = task.objective(cfg)  # how a batch becomes a loss
    check_margins(loss_fn, data.train, data.eval)  # data=pairs' margins: read by task=reward only
    # Generation evaluation's judge, loaded before the weights: a judge that cannot be had fails first.
    generation = evalgen.setup(cfg, accelerator, tokenizer, eval_pairs, run_dir)
    policy, parameters = _policy(cfg, task, data, loss_fn, accelerator, run_dir, stop)
    policy, optimization = _optimization(cfg, policy, accelerator, warmup, n_steps)
    models = _models(cfg, task, data, loss_fn, policy, parameters, accelerator)
    if generation is not None:
        evalgen.reference_samples(generation, cfg, accelerator, tokenizer, models.reference, models.unwrapped)
    state = {"step": 0}
    if resume_from is not None:
        state = checkpoint.load(accelerator, resume_from, run_dir)
        sync_offloaded(optimization.optimizer)  # CPU offload's host copies of the restored parameters
    resume_step = state["step"] if resume_from is not None else None
    sinks = _sinks(cfg, accelerator, run_dir, wandb_mode, resume_step, state["step"], n_steps)
    return Run(
        accelerator=accelerator,
        data=data,
        models=models,
        optimization=optimization,
        outputs=_outputs(cfg, accelerator, run_dir, run_shape, data, sinks, generation),
        cadence=Cadence(
            n_steps=n_steps,
            log_every=cfg.logger.log_every,
            eval_every=cfg.train.eval_every,
            generate_every=cfg.eval.generate_every,
            save_every=cfg.train.save_every,
            generate=generation is not None,
        ),
        start=state["step"],
        loop_state=state.get("loop", {}),
    )


def _start(cfg: Config, run_dir: Path, held: ExitStack) -> tuple[Any, Path | None, str]:
    """The Accelerator, the checkpoint to resume from (or None) and the W&B mode that can run
    here; the run directory held, the seed set, the launch and the config logged."""
    from accelerate.utils import set_seed

    t = cfg.train
    accum = config.check_world(t, world_size_from_env())
    accelerator = _make_accelerator(t, accum)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # messages once, from the main process
    held.enter_context(rundir.hold(run_dir, accelerator))  # every process calls it; the main one locks
    resume_from = _resume_point(t, run_dir, accelerator.is_main_process)
    wandb_mode = cfg.logger.wandb.mode
    if accelerator.is_main_process:  # only the main process opens sinks; the check takes at most 5 s
        slurm.record(run_dir)
        wandb_mode = resolve_wandb_mode(wandb_mode, run_dir)
    set_seed(t.seed)
    log.info("run directory: %s", run_dir)
    log.info(
        "processes: %d (%s) | device: %s | mixed precision: %s | model dtype: %s | batch %d = micro %d x accumulation %d x processes %d",
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.device,
        t.mixed_precision,
        cfg.model.dtype,
        t.batch_size,
        t.micro_batch_size,
        accum,
        accelerator.num_processes,
    )
    _to_log_file("config:\n" + OmegaConf.to_yaml(as_plain(cfg)))
    return accelerator, resume_from, wandb_mode


def _make_accelerator(t: TrainConfig, accum: int) -> Any:
    """The Accelerator for `train.mixed_precision` and `accum` micro batches per step (the
    launcher's environment cannot change it), or a UserError for what it cannot run."""
    from accelerate import Accelerator, DistributedType
    from accelerate.state import AcceleratorState

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no" and launcher != t.mixed_precision:
        log.warning(
            "accelerate launch asked for mixed precision %r; dpo-cli uses train.mixed_precision=%r",
            launcher,
            t.mixed_precision,
        )
    check_environment(accum)
    if world_size_from_env() == 1:
        # accelerate keeps its state for the whole process; the jobs of a Hydra sweep each
        # start from a clean one so that they may differ in precision or device.
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(
            mixed_precision=t.mixed_precision, cpu=cpu_only(), gradient_accumulation_plugin=accumulation_plugin(accum)
        )
    except ValueError as e:  # e.g. bf16 on a GPU without bf16 support
        raise ConfigError([f"train.mixed_precision={t.mixed_precision}: {e}"]) from None
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise UserError(
            "this FSDP launch uses FSDP version 1 (accelerate's default for --use_fsdp); dpo-cli runs FSDP2: launch "
            "with --config_file scripts/accelerate/fsdp.yaml, or set fsdp_version: 2 in your accelerate config"
        )
    configure_deepspeed(accelerator, t, accum)
    return accelerator


def _to_log_file(text: str) -> None:
    """Write `text` to the run's log file only (the console shows the run, not 80 lines of
    config; .hydra/config.yaml holds it too)."""
    record = logging.LogRecord(log.name, logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _resume_point(t: TrainConfig, run_dir: Path, main_process: bool = True) -> Path | None:
    """The checkpoint to resume from, after refusing to mix a new run into an old run dir. A
    directory whose run saved no checkpoint has nothing to continue: train.resume=auto starts
    it over, keeping the old metrics beside the new ones."""
    resume = t.resume
    if resume is None and slurm.restarts() > 0:
        log.info("SLURM requeued this job (restart %d): resuming from its latest checkpoint", slurm.restarts())
        resume = "auto"
    resume_from = checkpoint.resolve_resume(resume, run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if resume_from is not None or not metrics_file.exists() or metrics_file.stat().st_size == 0:
        return resume_from
    if resume == "auto":
        if main_process:  # one process sets the old rows aside; every process starts over
            kept = next(p for n in range(1, 10_000) if not (p := run_dir / f"metrics.abandoned-{n}.jsonl").exists())
            metrics_file.rename(kept)
            log.warning("%s saved no checkpoint: starting it over (its metrics are kept in %s)", run_dir, kept.name)
        return None
    if checkpoint.complete_checkpoints(run_dir):
        how = "continue it with train.resume=auto"
    else:
        how = "it saved no checkpoint; train.resume=auto starts it over (keeping its metrics.jsonl aside)"
    raise UserError(f"{run_dir} already holds a run (metrics.jsonl); {how}, or choose another hydra.run.dir")


def _data(cfg: Config, tokenizer: Any) -> tuple[Data, list[dict], int]:
    """The tokenized train and eval examples, the normalized eval pairs (for generation) and
    the run's length in optimizer steps."""
    t = cfg.train
    data = prepare(cfg.data, tokenizer, t.seed)
    log.info("data (the report mode=inspect prints):\n%s", report(data, tokenizer, t.batch_size))
    per_epoch = steps_per_epoch(len(data.train), t.batch_size)
    if per_epoch == 0:
        raise DataError(
            f"train.batch_size={t.batch_size} is larger than the {len(data.train)} training {data.unit}; lower it"
        )
    parts = Data(
        train=data.train,
        eval=data.eval,
        tokenizer=tokenizer,
        batch_size=t.batch_size,
        seed=t.seed,
        per_epoch=per_epoch,
        unit=data.unit,
        lengths=[example_length(ex) for ex in data.train] if t.sort_by_length else None,
    )
    return parts, data.eval_pairs, t.max_steps or t.epochs * per_epoch


def _policy(
    cfg: Config, task: tasks.Task, data: Data, loss_fn: Any, accelerator: Any, run_dir: Path, stop: StopOnSignal
) -> tuple[Any, int]:
    """The policy to train, as the task's model class, loaded, warm-started and wrapped with
    LoRA when asked, and its number of parameters."""
    check_targets(cfg.model, data.tokenizer)  # LoRA target modules, on the meta device: before the weights load
    policy = load_model(cfg.model, data.tokenizer, cfg.train.seed, task.auto_class, task.num_labels)
    if cfg.model.warm_start.steps:
        _warm_start(cfg, policy, data.train, data.tokenizer.pad_token_id, accelerator, run_dir, stop)
    policy = quantized(policy, cfg.model)  # after the warm start, which trains every weight; a no-op unless asked
    if cfg.model.lora.r is not None:
        policy = apply_lora(policy, cfg.model.lora, cfg.model.gradient_checkpointing, task.lora_task_type)
    trainable, total = count_parameters(policy)
    log.info(
        "model: %s | %.2fM trainable / %.2fM parameters | loss: %r",
        type(policy).__name__,
        trainable / 1e6,
        total / 1e6,
        loss_fn,
    )
    return policy, total


def _warm_start(
    cfg: Config, policy: Any, train_set: list[Tokenized], pad_id: int, accelerator: Any, run_dir: Path,
    stop: StopOnSignal,
) -> None:  # fmt: skip
    """model.warm_start on `policy` (or its saved weights), with a progress bar; a signal stops
    it within a step on every process."""
    if sharded(accelerator):
        raise UserError(
            "model.warm_start runs on every process with the whole model, which a sharded launch does not "
            "hold; train the SFT model first (loss=sft) and start from it, or use a DDP launch"
        )
    m = cfg.model
    source = {k: as_plain(getattr(m, k)) for k in ("name_or_path", "revision", "gguf_file", "random_init", "dtype")}
    warm_started(
        policy.to(accelerator.device), train_set, m.warm_start, cfg.train.seed, pad_id, run_dir / "warm_start",
        accelerator.is_main_process, source=source, progress=bool(cfg.logger.progress and accelerator.is_main_process),
        should_stop=lambda: stop.agreed(accelerator),
    )  # fmt: skip


def _optimization(cfg: Config, policy: Any, accelerator: Any, warmup: int, n_steps: int) -> tuple[Any, Optimization]:
    """The policy and its optimizer prepared by accelerate, the learning-rate schedule and the
    non-finite guard."""
    from hydra.utils import instantiate

    t = cfg.train
    optimizer = instantiate(cfg.optimizer)(params=[p for p in policy.parameters() if p.requires_grad])
    scheduler = make_scheduler(optimizer, cfg.scheduler.name, warmup, n_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if is_quantized(accelerator.unwrap_model(policy)):
        trainable_checkpoints(accelerator)  # checkpoints: the adapters; the quantized base is rebuilt on resume
    # The scheduler is stepped by hand once per optimizer step; registering it (instead of
    # preparing it) keeps it in checkpoints without accelerate stepping it once per process.
    accelerator.register_for_checkpointing(scheduler)
    optimization = Optimization(
        optimizer=optimizer,
        scheduler=scheduler,
        guard=Guard(limit=t.max_nonfinite_steps),
        micro_batch_size=t.micro_batch_size,
        max_grad_norm=t.max_grad_norm,
        engine_steps=accelerator.distributed_type.value == "DEEPSPEED",
    )
    return policy, optimization


def _models(
    cfg: Config, task: tasks.Task, data: Data, loss_fn: Any, policy: Any, parameters: int, accelerator: Any
) -> Models:
    """The prepared policy (of `parameters` parameters) with its layout, LM head and reference
    (from the policy before any update, or its own weights)."""
    t = cfg.train
    unwrapped = accelerator.unwrap_model(policy)
    if task.layout is not None:  # the task's scoring needs this layout; no LM head (its model has none)
        choice = layout.Choice(task.layout, None, task.layout_why, sharded(accelerator))
        log.info("batches: layout %s: %s", task.layout, task.layout_why)
    else:
        auto_attention = cfg.model.attn_implementation is None
        choice = layout.choose(t.layout, t.logits_chunk, unwrapped, sharded(accelerator), auto_attention)
        pad_id, needs = data.tokenizer.pad_token_id, loss_fn.needs
        choice = layout.probe(choice, unwrapped, data.train, pad_id, needs, t.micro_batch_size)
        layout.apply(choice, unwrapped)
        log.info("batches: %s", choice.describe())
    if t.compile:  # after the start-up check, which tries several back-ends and layouts, uncompiled
        log.info("train.compile: compiled %s (the first steps include compiling)", compile_layers(unwrapped))
    # The reference comes from the policy before any update (or its own weights). On resume it
    # is rebuilt the same way (same weights or same seed); the checkpoint then overwrites only
    # the policy, the optimizer and the scheduler.
    reference, eval_reference = _reference(
        cfg, loss_fn, data.tokenizer, unwrapped, data.train, data.eval, accelerator, choice
    )
    log.info("reference: %s", reference.describe() if reference else "none (no loss term needs one)")
    return Models(
        policy=policy,
        unwrapped=unwrapped,
        loss=loss_fn,
        reference=reference,
        eval_reference=eval_reference,
        layout=choice.layout,
        head=choice.head,
        flops=flops_per_token(parameters, reference),
    )


def _reference(
    cfg: Config,
    loss_fn: Loss,
    tokenizer: Any,
    policy: Any,
    train_set: list[Tokenized],
    eval_set: list[Tokenized],
    accelerator: Any,
    choice: layout.Choice,
) -> tuple[Any, Any]:
    """The reference sources for the train and eval sets: none when no loss term needs one,
    precomputed tables (reference.precompute), or one live model-backed source for both, each
    scoring batches of the policy's layout (`choice`)."""
    if not loss_fn.requires_reference:
        return None, None
    precompute = cfg.reference.precompute
    own_copy = cfg.reference.name_or_path is None and cfg.model.lora.r is None
    if sharded(accelerator) and own_copy and cfg.reference.dtype not in (None, cfg.model.dtype):
        raise UserError(
            f"reference.dtype={cfg.reference.dtype} needs a copy of the policy in that dtype, which a sharded "
            f"launch ({accelerator.distributed_type.value}) does not make: the initial policy itself, sharded, computes "
            "the reference log-probs. Remove reference.dtype, or use a DDP launch"
        )
    if sharded(accelerator) and own_copy and not precompute:
        # A frozen copy of a sharded policy would be a whole model per process: the initial
        # policy itself (sharded, before any update) computes the reference log-probs instead.
        log.info(
            "%s shards the policy: the reference log-probs are precomputed with the initial policy itself "
            "(reference.precompute=true), instead of a second, unsharded copy per process",
            accelerator.distributed_type.value,
        )
        precompute = True
    if precompute:
        from dpo_cli.refcache import precompute

        datasets = {"train": train_set, "eval": eval_set}
        refs = precompute(cfg, tokenizer, policy, datasets, accelerator, choice.layout, choice.head)
        return refs["train"], refs["eval"]
    reference = live_reference(cfg, tokenizer, policy, head=choice.head)
    if isinstance(reference, ModelReference):
        layout.check_reference(choice.layout, reference.model)
        layout.apply(choice, reference.model)
        reference.model = place_reference(reference.model, accelerator, cfg.train)
    return reference, reference


def _outputs(
    cfg: Config,
    accelerator: Any,
    run_dir: Path,
    run_shape: dict[str, Any],
    data: Data,
    sinks: Callable[[], MetricLogger],
    generation: Any,
) -> Outputs:
    """Where the run's results go: `sinks`, checkpoints (their `run_shape`), final/, samples, reports."""
    checkpointer = Checkpointer(
        accelerator=accelerator,
        run_dir=run_dir,
        run_shape=run_shape,
        n_train=len(data.train),
        batch_size=data.batch_size,
        keep=cfg.train.keep_checkpoints,
        merge_lora=cfg.export.merge_lora,
        chat_template=cfg.data.chat_template,
    )
    return Outputs(
        run_dir=run_dir,
        open_sinks=sinks,
        checkpointer=checkpointer,
        generation=generation,
        eval_settings=cfg.eval,
        report=cfg.logger.report,
        peak_tflops=cfg.logger.peak_tflops,
    )


def _sinks(
    cfg: Config, accelerator: Any, run_dir: Path, wandb_mode: str, resume_step: int | None, start: int, n_steps: int
) -> Callable[[], MetricLogger]:
    """What opens the run's metric sinks when the loop starts: metrics.jsonl (its rows after
    `resume_step` dropped), W&B, TensorBoard, MLflow and the progress bar on the main process;
    none elsewhere."""

    def open_sinks() -> MetricLogger:
        if not accelerator.is_main_process:
            return MetricLogger([])
        sinks: list[Any] = [JsonlSink(run_dir / "metrics.jsonl", resume_step=resume_step)]
        w = cfg.logger.wandb
        container = slurm.launcher_info(config.to_container(cfg))  # the config the trackers record
        if wandb_mode != "disabled":
            sinks.append(
                WandbSink(
                    wandb_mode, w.project, w.entity, w.name, w.group, w.tags, container, run_dir,
                    resume=resume_step is not None,
                )
            )  # fmt: skip
        sinks += tracking.sinks(cfg.logger, container, run_dir, resume_step)
        if cfg.logger.progress:  # last: it takes over the console handlers until closed
            sinks.append(ProgressSink(total=n_steps, initial=start))
        return MetricLogger(sinks)

    return open_sinks
