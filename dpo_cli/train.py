"""`run(cfg)`: build everything from the config, then one training loop, top to bottom."""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dpo_cli import checkpoint, config, evalgen, layout, rundir, slurm
from dpo_cli.data.batching import micro_batches, position, step_indices, steps_per_epoch
from dpo_cli.data.chat import load_template
from dpo_cli.data.collate import chosen_token_means
from dpo_cli.data.prepare import prepare
from dpo_cli.data.summary import report
from dpo_cli.data.tokenize import Tokenized, example_length, fingerprint
from dpo_cli.distributed import cpu_only, sharded, world_size_from_env
from dpo_cli.errors import ConfigError, DataError, Interrupted, NonFiniteError, UserError
from dpo_cli.evaluate import Averages, batch_loss, evaluate, make_batch
from dpo_cli.launch import accumulation_plugin, check_environment, configure_deepspeed, grad_norm_of
from dpo_cli.lmhead import Head
from dpo_cli.lora import apply_lora, check_targets
from dpo_cli.losses import Loss
from dpo_cli.metrics import JsonlSink, MetricLogger, ProgressSink, WandbSink, resolve_wandb_mode
from dpo_cli.modeling import check_max_length, count_parameters, load_model, load_tokenizer
from dpo_cli.recap import summary
from dpo_cli.reference import (
    ModelReference,
    check_reference_tokenizer,
    live_reference,
    place_reference,
    reference_model_config,
)
from dpo_cli.report import write_reports
from dpo_cli.schedule import make_scheduler, warmup_steps
from dpo_cli.signals import StopOnSignal
from dpo_cli.throughput import Window, flops_per_token
from dpo_cli.warmstart import warm_started

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job (the current directory outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(os.getcwd())


def _open_sinks(cfg: DictConfig, r: Run) -> MetricLogger:
    if not r.accelerator.is_main_process:
        return MetricLogger([])
    run_dir, start, resumed = r.run_dir, r.start, r.resumed
    sinks: list[Any] = [JsonlSink(run_dir / "metrics.jsonl", resume_step=start if resumed else None)]
    w = cfg.logger.wandb
    if r.wandb_mode != "disabled":
        container = slurm.launcher_info(config.to_container(cfg))
        sinks.append(
            WandbSink(r.wandb_mode, w.project, w.entity, w.name, w.group, w.tags, container, run_dir, resume=resumed)
        )
    if cfg.logger.progress:  # last: it takes over the console handlers until closed
        sinks.append(ProgressSink(total=r.n_steps, initial=start))
    return MetricLogger(sinks)


def _make_accelerator(t: DictConfig, accum: int) -> Any:
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


def _resume_point(t: DictConfig, run_dir: Path, main_process: bool = True) -> Path | None:
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


@dataclass
class Run:
    """Everything the training loop needs, built from the config by `build`."""

    run_dir: Path
    accelerator: Any
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
    loop_state: dict[str, Any]  # the resumed checkpoint's logging window and guard counters ({} if none)
    wandb_mode: str  # logger.wandb.mode as it can run here (online may become offline)
    engine_steps: bool = False  # DeepSpeed: the engine steps the optimizer inside backward
    flops: tuple[float, float] = (0.0, 0.0)  # for mfu: per trained token, per forward-only token
    layout: str = "padded"  # how sequences sit in the model's rows (dpo_cli.layout)
    head: Head | None = None  # the policy's chunked LM head (None: full logits)
    lengths: list[int] | None = None  # tokens per training example, for train.sort_by_length
    generation: Any = None  # evalgen.GenerationEval when a judge is configured
    unit: str = "pairs"  # what an example is: "pairs", or "examples" for unpaired data


def _load_data(cfg: DictConfig, tokenizer: Any) -> tuple[list[Tokenized], list[Tokenized], list[dict], int, int, str]:
    """Tokenized train and eval examples, the normalized eval pairs (for generation), steps per
    epoch, the run's length and what an example is ("pairs", or "examples" when unpaired)."""
    t = cfg.train
    data = prepare(cfg.data, tokenizer, t.seed)
    log.info("data (the report mode=inspect prints):\n%s", report(data, tokenizer, t.batch_size))
    per_epoch = steps_per_epoch(len(data.train), t.batch_size)
    if per_epoch == 0:
        raise DataError(
            f"train.batch_size={t.batch_size} is larger than the {len(data.train)} training {data.unit}; lower it"
        )
    return data.train, data.eval, data.eval_pairs, per_epoch, t.max_steps or t.epochs * per_epoch, data.unit


def _warm_start(
    cfg: DictConfig, policy: Any, train_set: list[Tokenized], pad_id: int, accelerator: Any, run_dir: Path,
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
    source = {k: OmegaConf.to_container(m, resolve=True)[k] for k in ("name_or_path", "revision", "gguf_file",
                                                                      "random_init", "dtype")}  # fmt: skip
    warm_started(
        policy.to(accelerator.device), train_set, m.warm_start, cfg.train.seed, pad_id, run_dir / "warm_start",
        accelerator.is_main_process, source=source, progress=bool(cfg.logger.progress and accelerator.is_main_process),
        should_stop=lambda: stop.agreed(accelerator),
    )  # fmt: skip


def build(cfg: DictConfig, held: ExitStack, stop: StopOnSignal) -> Run:
    """Validate the config, then build the run's parts: data before weights, so that a bad
    dataset fails before minutes of model loading; the resume point before any training.
    The run directory's lock joins `held`, which the caller keeps until the run ends."""
    from accelerate.utils import set_seed
    from hydra.utils import instantiate

    config.validate(cfg)
    run_dir = run_dir_of(cfg)
    t = cfg.train
    accum = config.check_world(cfg, world_size_from_env())
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
    _to_log_file("config:\n" + OmegaConf.to_yaml(cfg, resolve=True))

    check_max_length(cfg.model, cfg.data.max_length)  # from the model's config, before data and weights
    tokenizer = load_tokenizer(cfg.model)
    if cfg.reference.name_or_path is not None:
        check_max_length(reference_model_config(cfg), cfg.data.max_length)
        check_reference_tokenizer(cfg, tokenizer)
    train_set, eval_set, eval_pairs, per_epoch, n_steps, unit = _load_data(cfg, tokenizer)
    warmup = warmup_steps(cfg.scheduler.warmup_steps, cfg.scheduler.warmup_ratio, n_steps)
    run_shape = {"n_steps": n_steps, "data": fingerprint(train_set), **checkpoint.settings(cfg)}
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, run_shape)

    loss_fn = instantiate(cfg.loss)
    generation = evalgen.setup(
        cfg, accelerator, tokenizer, eval_pairs, run_dir
    )  # a judge fails before the weights load
    check_targets(cfg.model, tokenizer)  # LoRA target modules, on the meta device: before the weights load
    policy = load_model(cfg.model, tokenizer, t.seed)
    if cfg.model.warm_start.steps:
        _warm_start(cfg, policy, train_set, tokenizer.pad_token_id, accelerator, run_dir, stop)
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
    scheduler = make_scheduler(optimizer, cfg.scheduler.name, warmup, n_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    # The scheduler is stepped by hand once per optimizer step; registering it (instead of
    # preparing it) keeps it in checkpoints without accelerate stepping it once per process.
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(policy)
    choice = layout.choose(t.layout, t.logits_chunk, unwrapped, sharded(accelerator))
    choice = layout.probe(choice, unwrapped, train_set, tokenizer.pad_token_id, loss_fn.needs, t.micro_batch_size)
    log.info("batches: %s", choice.describe())
    # The reference comes from the policy before any update (or its own weights). On resume it
    # is rebuilt the same way (same weights or same seed); the checkpoint then overwrites only
    # the policy, the optimizer and the scheduler.
    reference, eval_reference = _reference(cfg, loss_fn, tokenizer, unwrapped, train_set, eval_set, accelerator, choice)
    log.info("reference: %s", reference.describe() if reference else "none (no loss term needs one)")
    if generation is not None:
        evalgen.reference_samples(generation, cfg, accelerator, tokenizer, reference, unwrapped)
    state = checkpoint.load(accelerator, resume_from, run_dir) if resume_from is not None else {"step": 0}
    return Run(
        run_dir, accelerator, train_set, eval_set, per_epoch, n_steps, run_shape, tokenizer, loss_fn,
        policy, unwrapped, optimizer, scheduler, reference, eval_reference, state["step"], resume_from is not None,
        state.get("loop", {}), wandb_mode, accelerator.distributed_type.value == "DEEPSPEED",
        flops_per_token(total, reference), choice.layout, choice.head,
        [example_length(ex) for ex in train_set] if t.sort_by_length else None, generation, unit,
    )  # fmt: skip


def _reference(
    cfg: DictConfig,
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
        reference.model = place_reference(reference.model, accelerator, cfg.train)
    return reference, reference


def run(cfg: DictConfig) -> dict[str, float]:
    """Train the policy described by `cfg`; return the last train and eval metrics. Signals
    (SIGTERM, SIGINT, SIGUSR1) are caught from the start: during the loop they end the run
    after the current step, with a checkpoint (see `train`)."""
    with StopOnSignal() as stop, ExitStack() as held:
        try:
            r = build(cfg, held, stop)
            return train(cfg, r, stop)
        except Interrupted as e:
            # Under SLURM a warning signal requeues the job, once the checkpoint is saved and the
            # sinks are closed, while the handlers are still ours: the launcher's SIGTERM to a
            # slower rank 0 (after the others exit) cannot kill it before the requeue. (A signal
            # during the warm start, before any checkpoint, requeues it too: the job starts again.)
            signum = e.signum or stop.received
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                slurm.hand_on(signum, stop.previous(signum))
            _part()
            raise
        except UserError:  # non-finite, disk, a refusal in build: the processes still part cleanly
            _part()
            raise


def _part() -> None:
    """Tear down the process group (what accelerator.end_training does without trackers), so
    that processes leaving on an error exit cleanly."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def train(cfg: DictConfig, r: Run, stop: StopOnSignal) -> dict[str, float]:
    """The training loop, top to bottom: one optimizer step per iteration, then logging,
    evaluation and checkpoints when due; a non-finite step is skipped on every process; a
    signal ends the run after the step, with a checkpoint (exit code EXIT_INTERRUPTED)."""
    t = cfg.train
    accelerator, policy = r.accelerator, r.policy
    last: dict[str, float] = {}
    window = Window(accelerator.device)
    nonfinite = {"total": 0, "consecutive": 0}
    if r.loop_state:
        window.restore(r.loop_state["window"])
        nonfinite.update(r.loop_state["nonfinite"])

    def save(done: int) -> Path:
        epoch, batch_in_epoch = position(done, len(r.train_set), t.batch_size)
        loop = {"window": window.state(), "nonfinite": dict(nonfinite)}
        state = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, **r.run_shape, "loop": loop}
        return checkpoint.save(accelerator, r.run_dir, done, state, t.keep_checkpoints)

    with _open_sinks(cfg, r) as metrics:
        policy.train()
        for step in range(r.start, r.n_steps):
            started = time.perf_counter()
            indices = step_indices(step, len(r.train_set), t.batch_size, t.seed)
            step_parts, finite = _forward_backward(cfg, r, indices, window)
            max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
            grad_norm = grad_norm_of(accelerator.clip_grad_norm_(policy.parameters(), max_norm), accelerator.device)
            lr = r.scheduler.get_last_lr()[0]
            # The guard: a non-finite loss or gradient norm on any process skips the update on all.
            # (Under DeepSpeed the engine has already stepped inside backward: the guard counts.)
            if grad_norm is not None:
                finite = finite * torch.isfinite(grad_norm)
            if _all_finite(accelerator, finite):
                _optimizer_step(r.optimizer, lr)
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
                    r.scheduler.step()
                window.metrics.add(step_parts.parts)
                nonfinite["consecutive"] = 0
            else:
                if accelerator.scaler is not None:  # fp16: the loss scaler sees the inf, skips the
                    r.optimizer.step()  # update itself and lowers its scale for the next step
                if r.engine_steps:  # DeepSpeed stepped inside backward: keep the schedule in line
                    r.scheduler.step()
                nonfinite["total"] += 1
                nonfinite["consecutive"] += 1
                log.warning(
                    "step %d: non-finite loss or gradient norm (%s); update skipped on every process "
                    "(%d in a row); the step's pairs: %s",
                    step + 1, grad_norm, nonfinite["consecutive"], sorted(indices),
                )  # fmt: skip
            r.optimizer.zero_grad(set_to_none=True)
            window.steps += 1
            window.seconds += time.perf_counter() - started

            done, saved = step + 1, False
            if done % cfg.logger.log_every == 0 or done == r.n_steps:
                row = {
                    "step": done,
                    "epoch": round(done / r.per_epoch, 4),
                    **window.metrics.reduce(accelerator),
                    **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                    "lr": lr,
                    "nonfinite_steps": nonfinite["total"],
                    **window.throughput(accelerator, t.batch_size, r.unit, r.flops, cfg.logger.peak_tflops),
                }
                metrics.log(row)
                last.update(row)
                window.clear()
            eval_due = bool(t.eval_every and done % t.eval_every == 0) or done == r.n_steps
            generate_every = cfg.eval.generate_every
            generate_due = r.generation is not None and (
                bool(generate_every and done % generate_every == 0) or done == r.n_steps
            )
            if eval_due or generate_due:  # before the checkpoint: a resume never repeats it
                last.update(_evaluate(cfg, r, metrics, done, eval_due, generate_due))
            if t.max_nonfinite_steps and nonfinite["consecutive"] >= t.max_nonfinite_steps:
                raise NonFiniteError(_nonfinite_message(t.max_nonfinite_steps, save(done)))
            if t.save_every and done % t.save_every == 0:
                save(done)
                saved = True
            signal_name = stop.agreed(accelerator)
            if signal_name:
                path = checkpoint.checkpoints_dir(r.run_dir) / f"step-{done}" if saved else save(done)
                raise Interrupted(
                    f"{signal_name}: stopped after step {done} of {r.n_steps}; checkpoint {path}. Continue with the "
                    f"same command plus train.resume=auto hydra.run.dir={r.run_dir}",
                    signum=stop.received or int(signal.Signals[signal_name]),
                )

    if r.start == r.n_steps:
        log.info("the run had already finished at step %d; nothing left to train", r.n_steps)
    if cfg.data.chat_template:  # the template the data was rendered with travels with the model
        r.tokenizer.chat_template = load_template(cfg.data.chat_template)
    checkpoint.save_final(accelerator, policy, r.tokenizer, r.run_dir / "final", cfg.export.merge_lora)
    if accelerator.is_main_process:
        if cfg.logger.report:
            write_reports(r.run_dir)
        log.info("%s", summary(r.run_dir, last, r.n_steps, r.generation, report=cfg.logger.report))
    accelerator.end_training()  # tears down the process group so processes exit cleanly
    return last


def _forward_backward(cfg: DictConfig, r: Run, indices: list[int], window: Window) -> tuple[Averages, torch.Tensor]:
    """Forward and backward passes over this process's micro batches of one optimizer step
    (`indices`: the step's pairs); gradients accumulate. Returns the step's metric parts and
    whether every loss was finite (1 or 0)."""
    accelerator, policy = r.accelerator, r.policy
    shards = micro_batches(
        indices, accelerator.process_index, accelerator.num_processes, cfg.train.micro_batch_size, r.lengths
    )
    step_parts, finite = Averages(), torch.ones((), device=accelerator.device)
    # A token-mean NLL term divides by the whole step's tokens (every process sees the step's
    # indices), not each micro batch's: the split of the batch then changes nothing.
    token_means = chosen_token_means([r.train_set[i] for i in indices])

    def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
        # A batch statistic a loss uses (KTO's KL estimate): every process joins this reduce on
        # every micro batch, since all of them step through the same number of micro batches.
        return accelerator.reduce(x, "mean")

    # accelerate counts micro batches to decide when to synchronize; a step starts from zero
    # (a checkpoint restores its counter, which another number of processes would misalign).
    accelerator.step = 0
    for idx in shards:
        batch = make_batch(r.train_set, idx, r.tokenizer.pad_token_id, r.loss_fn, accelerator.device, r.layout)
        # accelerate owns accumulation (configured with the step's micro batches per process, see
        # launch.accumulation_plugin): gradients synchronize only on the step's last micro
        # batch, and backward divides each micro batch's mean loss by their number, so that the
        # accumulated gradient is the mean over this process's share; the all-reduce (DDP, FSDP,
        # DeepSpeed) then averages over processes.
        with accelerator.accumulate(policy), accelerator.autocast():
            loss, parts = batch_loss(policy, r.reference, r.loss_fn, batch, mean_over_processes, r.head, token_means)
            accelerator.backward(loss)
        step_parts.add(parts)
        finite *= torch.isfinite(loss.detach()).all()
        window.add_tokens(batch)
    return step_parts, finite


def _optimizer_step(optimizer: Any, lr: float) -> None:
    """optimizer.step(), with a learning rate whose step size does not fit the parameters'
    dtype (Adam at lr 1e38: lr / (1 - beta1) overflows float32 inside torch) told as such."""
    try:
        optimizer.step()
    except RuntimeError as e:
        if "without overflow" not in str(e):
            raise
        raise UserError(
            f"the optimizer's step size at learning rate {lr:g} overflows the weights' dtype ({e}); lower optimizer.lr"
        ) from None


def _all_finite(accelerator: Any, finite: torch.Tensor) -> bool:
    """Whether `finite` (1 or 0) is 1 on every process: all of them take the same branch."""
    if accelerator.num_processes > 1:
        # accelerate's reduce has no "min" (it would sum): any process's 1 - finite, by max.
        finite = 1 - accelerator.reduce(1 - finite.float(), "max")
    return bool(finite.item())


def _evaluate(
    cfg: DictConfig, r: Run, metrics: MetricLogger, step: int, preference: bool = True, generation: bool = False
) -> dict[str, float]:
    """Evaluate on the held-out set (the preference metrics, and generation against the
    reference when due), log the eval row, redraw the reports and return the row."""
    values: dict[str, float] = {}
    if preference and r.eval_set:
        pad_id = r.tokenizer.pad_token_id
        values = evaluate(
            r.unwrapped, r.eval_reference, r.loss_fn, r.eval_set, r.accelerator, cfg.train.micro_batch_size, pad_id,
            r.layout, r.head,
        )  # fmt: skip
    if generation:
        values.update(evalgen.run(r.generation, r.unwrapped, r.tokenizer, cfg.eval, r.accelerator, step, metrics))
    if not values:
        return {}
    row = {"step": step, **values}
    metrics.log(row)
    log.info("eval step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in values.items()))
    if r.accelerator.is_main_process and cfg.logger.report:
        try:  # the report is a view of metrics.jsonl and samples/: failing to draw it never stops training
            write_reports(r.run_dir)
        except Exception as e:  # noqa: BLE001 - whatever matplotlib or the disk raises
            log.warning("could not redraw the reports in %s: %s", r.run_dir, e)
    return row


def _nonfinite_message(limit: int, path: Path) -> str:
    return (
        f"{limit} optimizer steps in a row had a non-finite loss or gradient norm (train.max_nonfinite_steps="
        f"{limit}); stopped with the last good weights in {path} (final/ not written). Likely causes: a "
        "learning rate too high (lower optimizer.lr); fp16 overflow (use bf16, or model.dtype=float32 with "
        "train.mixed_precision=fp16); empty responses or a data row that tokenizes badly (check the pair "
        "indices logged above with mode=inspect)"
    )
