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
from dpo_cli.data.prepare import prepare
from dpo_cli.data.summary import report
from dpo_cli.data.tokenize import Tokenized, example_length, fingerprint
from dpo_cli.distributed import cpu_only, sharded, world_size_from_env
from dpo_cli.errors import ConfigError, DataError, Interrupted, NonFiniteError, UserError
from dpo_cli.evaluate import Averages, batch_loss, evaluate, make_batch
from dpo_cli.launch import accumulation_plugin, check_environment, configure_deepspeed, grad_norm_of
from dpo_cli.lmhead import Head
from dpo_cli.logprobs import KL_ROWS
from dpo_cli.lora import apply_lora
from dpo_cli.losses import Loss
from dpo_cli.metrics import JsonlSink, MetricLogger, ProgressSink, WandbSink, resolve_wandb_mode
from dpo_cli.modeling import check_max_length, count_parameters, load_model, load_tokenizer
from dpo_cli.recap import summary
from dpo_cli.reference import (
    ModelReference,
    PrecomputedReference,
    check_reference_tokenizer,
    live_reference,
    place_reference,
    reference_model_config,
)
from dpo_cli.report import write_reports
from dpo_cli.signals import StopOnSignal
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


def _schedule(name: str, warmup: int) -> str:
    """transformers' `constant` ignores warmup; with a warmup, `constant_with_warmup` honours it."""
    if name == "constant" and warmup > 0:
        log.info("scheduler.name=constant with %d warmup steps: using constant_with_warmup", warmup)
        return "constant_with_warmup"
    return name


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
    flops_per_token: float = 0.0  # for mfu: 6N (policy forward and backward), + 2N with a live reference
    layout: str = "padded"  # how sequences sit in the model's rows (dpo_cli.layout)
    head: Head | None = None  # the policy's chunked LM head (None: full logits)
    lengths: list[int] | None = None  # tokens per training example, for train.sort_by_length
    generation: Any = None  # evalgen.GenerationEval when a judge is configured


def _load_data(cfg: DictConfig, tokenizer: Any) -> tuple[list[Tokenized], list[Tokenized], list[dict], int, int]:
    """Tokenized train and eval examples, the normalized eval pairs (for generation), steps per
    epoch and the run's length."""
    t = cfg.train
    data = prepare(cfg.data, tokenizer, t.seed)
    log.info("data (the report mode=inspect prints):\n%s", report(data, tokenizer, t.batch_size))
    per_epoch = steps_per_epoch(len(data.train), t.batch_size)
    if per_epoch == 0:
        raise DataError(
            f"train.batch_size={t.batch_size} is larger than the {len(data.train)} training {data.unit}; lower it"
        )
    return data.train, data.eval, data.eval_pairs, per_epoch, t.max_steps or t.epochs * per_epoch


def build(cfg: DictConfig, held: ExitStack) -> Run:
    """Validate the config, then build the run's parts: data before weights, so that a bad
    dataset fails before minutes of model loading; the resume point before any training.
    The run directory's lock joins `held`, which the caller keeps until the run ends."""
    from accelerate.utils import set_seed
    from hydra.utils import instantiate
    from transformers import get_scheduler

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
    train_set, eval_set, eval_pairs, per_epoch, n_steps = _load_data(cfg, tokenizer)
    warmup = _warmup_steps(cfg.scheduler, n_steps)
    run_shape = {"n_steps": n_steps, "data": fingerprint(train_set), **checkpoint.settings(cfg)}
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, run_shape)

    loss_fn = instantiate(cfg.loss)
    generation = evalgen.setup(
        cfg, accelerator, tokenizer, eval_pairs, run_dir
    )  # a judge fails before the weights load
    policy = load_model(cfg.model, tokenizer, t.seed)
    if cfg.model.warm_start.steps:
        if sharded(accelerator):
            raise UserError(
                "model.warm_start runs on every process with the whole model, which a sharded launch does not "
                "hold; train the SFT model first (loss=sft) and start from it, or use a DDP launch"
            )
        warm_started(policy.to(accelerator.device), train_set, cfg.model.warm_start, t.seed, tokenizer.pad_token_id,
                     run_dir / "warm_start", accelerator.is_main_process)  # fmt: skip
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
    scheduler = get_scheduler(_schedule(cfg.scheduler.name, warmup), optimizer, warmup, n_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    # The scheduler is stepped by hand once per optimizer step; registering it (instead of
    # preparing it) keeps it in checkpoints without accelerate stepping it once per process.
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(policy)
    choice = layout.choose(t.layout, t.logits_chunk, unwrapped, sharded(accelerator))
    choice = layout.probe(choice, unwrapped, train_set[:2], tokenizer.pad_token_id, KL_ROWS in loss_fn.needs)
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
        _flops_per_token(total, reference), choice.layout, choice.head,
        [example_length(ex) for ex in train_set] if t.sort_by_length else None, generation,
    )  # fmt: skip


def _flops_per_token(parameters: int, reference: Any) -> float:
    """The model FLOPs per trained token that `mfu` counts: 6N for the policy's forward and
    backward passes (N = its parameters), plus 2N for a reference forward pass when a model
    runs one each step (not for precomputed log-probs or none). Attention's own FLOPs, which
    grow with the sequence length, are left out, as in the usual 6N estimate."""
    live = reference is not None and not isinstance(reference, PrecomputedReference)
    return float((8 if live else 6) * parameters)


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


class Window:
    """What the logging window accumulates over its logger.log_every steps: metric sums, tokens
    (the sequences' own, prompt counted once per response as any padded trainer computes
    it; the tokens actually computed, fewer when a prompt is shared; all positions computed,
    padding included), steps and the seconds spent training them (the steps alone: evaluation
    and checkpoints are not training time). It is saved in each checkpoint, so a run
    interrupted mid-window logs the same rows after resuming as it would have without the
    interruption."""

    COUNTERS = ("tokens", "computed", "positions")

    def __init__(self, device: Any) -> None:
        self.metrics = Averages()
        self.counts = torch.zeros(len(self.COUNTERS), device=device)
        self.steps = 0
        self.seconds = 0.0

    def add_tokens(self, batch: dict[str, torch.Tensor]) -> None:
        mask = batch["attention_mask"]
        self.counts += torch.stack([batch["length"].sum(), mask.sum(), torch.tensor(mask.numel())]).to(self.counts)

    def clear(self) -> None:
        self.metrics.clear()
        self.counts.zero_()
        self.steps, self.seconds = 0, 0.0

    def state(self) -> dict[str, Any]:
        parts = {k: [s.item(), c.item()] for k, (s, c) in self.metrics.parts.items()}
        counts = dict(zip(self.COUNTERS, self.counts.tolist(), strict=True))
        return {"parts": parts, **counts, "steps": self.steps, "seconds": self.seconds}

    def restore(self, state: dict[str, Any]) -> None:
        device = self.counts.device
        self.metrics.parts = {
            k: (torch.tensor(s, device=device), torch.tensor(c, device=device)) for k, (s, c) in state["parts"].items()
        }
        # Checkpoints of earlier versions lack "computed" (then equal to tokens) and "positions".
        values = [state["tokens"], state.get("computed", state["tokens"]), state.get("positions", 0.0)]
        self.counts.copy_(torch.tensor(values))
        self.steps = state["steps"]
        self.seconds = state.get("seconds", 0.0)

    def throughput(self, accelerator: Any, batch_size: int, flops_per_token: float, peak: float | None) -> dict:
        """Pairs and sequence tokens per second of training time, over all processes; the share
        of computed positions that were padding; and MFU (over the tokens actually computed)
        when the peak is known."""
        tokens, computed, positions = accelerator.reduce(self.counts.clone(), "sum").tolist()
        seconds = max(self.seconds, 1e-9)
        row = {
            "tokens_per_s": tokens / seconds,
            "pairs_per_s": batch_size * self.steps / seconds,
            "padding_share": 1 - computed / positions if positions else 0.0,
        }
        if peak:
            row["mfu"] = flops_per_token * computed / seconds / (peak * 1e12 * accelerator.num_processes)
        return row


def run(cfg: DictConfig) -> dict[str, float]:
    """Train the policy described by `cfg`; return the last train and eval metrics. Signals
    (SIGTERM, SIGINT, SIGUSR1) are caught from the start: during the loop they end the run
    after the current step, with a checkpoint (see `train`)."""
    with StopOnSignal() as stop, ExitStack() as held:
        r = build(cfg, held)
        try:
            return train(cfg, r, stop)
        except Interrupted as e:
            # Under SLURM a warning signal requeues the job, once the checkpoint is saved and the
            # sinks are closed, while the handlers are still ours: the launcher's SIGTERM to a
            # slower rank 0 (after the others exit) cannot kill it before the requeue.
            if r.accelerator.is_main_process:
                slurm.hand_on(e.signum, stop.previous(e.signum))
            r.accelerator.end_training()
            raise
        except UserError:  # non-finite, disk: the processes still part cleanly
            r.accelerator.end_training()
            raise


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
                r.optimizer.step()
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
                    **window.throughput(accelerator, t.batch_size, r.flops_per_token, cfg.logger.peak_tflops),
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
        write_reports(r.run_dir)
        log.info("%s", summary(r.run_dir, last, r.n_steps, r.generation))
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
            loss, parts = batch_loss(policy, r.reference, r.loss_fn, batch, mean_over_processes, r.head)
            accelerator.backward(loss)
        step_parts.add(parts)
        finite *= torch.isfinite(loss.detach()).all()
        window.add_tokens(batch)
    return step_parts, finite


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
    if r.accelerator.is_main_process:
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
