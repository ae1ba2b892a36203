"""`run(cfg)`: build the run's parts (`dpo_cli.build`), then one training loop, top to bottom:
step -> log -> evaluate -> save -> stop, each when its due-rule says so."""

from __future__ import annotations

import functools
import logging
import os
import signal
from contextlib import ExitStack, nullcontext
from datetime import timedelta
from pathlib import Path

import torch

from dpo_cli import evalgen, harness, publish, slurm
from dpo_cli.build import build
from dpo_cli.errors import Interrupted, NonFiniteError, UserError
from dpo_cli.evaluate import evaluate
from dpo_cli.metrics import MetricLogger
from dpo_cli.parts import Cadence, Run
from dpo_cli.recap import summary
from dpo_cli.report import write_reports
from dpo_cli.schema import Config, HarnessConfig
from dpo_cli.signals import StopOnSignal
from dpo_cli.step import train_step
from dpo_cli.throughput import Window

log = logging.getLogger(__name__)


def run_dir_of() -> Path:
    """Hydra's output directory for this job (the current directory outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(os.getcwd())


def run(cfg: Config, run_dir: Path | None = None, stop: StopOnSignal | None = None) -> dict[str, float]:
    """Train the policy described by `cfg` in `run_dir` (default: Hydra's output directory; a
    task=iterative round's directory); return the last train and eval metrics. `stop`: the
    caller's signal handlers (task=iterative's), which a signal before the run started may
    already have reached; default: the run's own. Signals
    (SIGTERM, SIGINT, SIGUSR1) are caught from the start: during the loop they end the run
    after the current step, with a checkpoint (see `train`)."""
    with ExitStack() as held:  # the run directory's lock, held until the push is done
        with StopOnSignal() if stop is None else nullcontext(stop) as stop:
            try:
                r = build(cfg, run_dir or run_dir_of(), held, stop)
                last = train(r, stop)
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
            except UserError as e:  # non-finite, disk, a refusal in build: the processes still part cleanly
                _part(e)
                raise
        # The model card in final/ and the push, with the signal handlers restored: Ctrl-C or a
        # SIGTERM stops an upload (final/ is complete by now) rather than waiting for a next step.
        if r.accelerator.is_main_process:
            publish.finish(cfg, r.outputs.run_dir, r.cadence.n_steps, _kept(r), r.data.unit)
        return last


def _kept(r: Run) -> dict[str, int]:
    return {"train": len(r.data.train), "eval": len(r.data.eval)}


# How long the other processes wait for the main one to report an error they all met.
REPORT_WAIT = timedelta(seconds=10)


def _part(error: UserError | None = None) -> None:
    """Tear down the process group (what accelerator.end_training does without trackers), so
    that processes leaving on an error exit cleanly. With an `error`, the main process reports it
    first (cli then leaves it reported) and, on gloo, the others wait for that at a barrier: a
    launcher stops every process as soon as one has exited, which cut the main process's report
    short when the others left first. The barrier gives up after REPORT_WAIT (an error met by
    some processes only: the others are elsewhere)."""
    if not torch.distributed.is_initialized():
        return
    if error is not None:
        if torch.distributed.get_rank() == 0:
            logging.getLogger("dpo_cli").error("%s", error)  # as cli reports errors
            error.reported = True
        if torch.distributed.get_backend() == "gloo":
            try:
                torch.distributed.monitored_barrier(timeout=REPORT_WAIT)
            except RuntimeError:
                pass  # a process that did not come: its own error, or none, reaches the launcher
    torch.distributed.destroy_process_group()


def train(r: Run, stop: StopOnSignal) -> dict[str, float]:
    """The training loop, top to bottom: one optimizer step per iteration (`train_step`; a
    non-finite one is skipped on every process), then logging, evaluation and a checkpoint when
    due. Too many non-finite steps in a row, or a signal, end the run after the step, with a
    checkpoint (a signal's exit code is EXIT_INTERRUPTED)."""
    data, models, opt, out, due = r.data, r.models, r.optimization, r.outputs, r.cadence
    window, last = Window(r.accelerator.device), {}
    if r.loop_state:  # a resumed run continues its logging window and the guard's counts
        window.restore(r.loop_state["window"])
        opt.guard.restore(r.loop_state["nonfinite"])
    benchmarks = out.eval_settings.harness if out.eval_settings.harness.at_end and r.start < due.n_steps else None
    if benchmarks is not None:
        harness.check_launch(benchmarks, r.accelerator)  # before training, not after it
    with out.open_sinks() as metrics:
        models.policy.train()
        for step in range(r.start, due.n_steps):
            grad_norm, lr = train_step(r.accelerator, data, models, opt, step, window)
            done = step + 1
            if log_due(done, due):
                last.update(_log(r, metrics, window, done, grad_norm, lr))
            preference, generation = eval_due(done, due), generate_due(done, due)
            if preference or generation:  # before the checkpoint: a resume never repeats it
                last.update(_evaluate(r, metrics, done, preference, generation))
            if opt.guard.exhausted:
                raise NonFiniteError(opt.guard.message(_save(r, window, done)))
            saved = save_due(done, due)
            if saved:
                _save(r, window, done)
            signal_name = stop.agreed(r.accelerator)
            if signal_name:
                path = out.checkpointer.path(done) if saved else _save(r, window, done)
                raise _interrupted(r, stop, signal_name, done, path)
        failed = _benchmarks(r, metrics, benchmarks, last) if benchmarks is not None else None
        out.checkpointer.export(models.policy, r.data.tokenizer)  # final/, whatever the benchmarks did
        if failed is not None:
            raise failed
    _finish(r, last)
    return last


def every(done: int, period: int | None) -> bool:
    """Whether optimizer step `done` (counted from 1) ends a period of `period` steps; never
    when `period` is None or 0."""
    return bool(period) and done % period == 0


def log_due(done: int, c: Cadence) -> bool:
    """A training row every logger.log_every steps, and at the last step."""
    return every(done, c.log_every) or done == c.n_steps


def eval_due(done: int, c: Cadence) -> bool:
    """The held-out preference metrics every train.eval_every steps, and at the last step."""
    return every(done, c.eval_every) or done == c.n_steps


def generate_due(done: int, c: Cadence) -> bool:
    """Generation against the reference, when a judge is configured: every eval.generate_every
    steps, and at the last step."""
    return c.generate and (every(done, c.generate_every) or done == c.n_steps)


def save_due(done: int, c: Cadence) -> bool:
    """A checkpoint every train.save_every steps (the last step's model goes to final/)."""
    return every(done, c.save_every)


def _log(
    r: Run, metrics: MetricLogger, window: Window, done: int, grad_norm: torch.Tensor | None, lr: float
) -> dict[str, float]:
    """Log the training row of the window that step `done` closes (its metrics averaged over
    its steps and the processes, its throughput over its training time); the window starts over."""
    row = {
        "step": done,
        "epoch": round(done / r.data.per_epoch, 4),
        **window.metrics.reduce(r.accelerator),
        **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
        "lr": lr,
        "nonfinite_steps": r.optimization.guard.total,
        **window.throughput(r.accelerator, r.data.batch_size, r.data.unit, r.models.flops, r.outputs.peak_tflops),
    }
    metrics.log(row)
    window.clear()
    return row


def _evaluate(
    r: Run, metrics: MetricLogger, step: int, preference: bool = True, generation: bool = False
) -> dict[str, float]:
    """Evaluate on the held-out set (the preference metrics, and generation against the
    reference when due), log the eval row, redraw the reports and return the row."""
    m, values = r.models, {}
    if preference and r.data.eval:
        values = evaluate(
            m.unwrapped, m.eval_reference, m.loss, r.data.eval, r.accelerator, r.optimization.micro_batch_size,
            r.data.tokenizer.pad_token_id, m.layout, m.head,
        )  # fmt: skip
    if generation:
        out = r.outputs
        values.update(evalgen.run(out.generation, m.unwrapped, r.data.tokenizer, out.eval_settings, r.accelerator,
                                  step, metrics))  # fmt: skip
    if not values:
        return {}
    row = {"step": step, **values}
    metrics.log(row)
    log.info("eval step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in values.items()))
    if r.accelerator.is_main_process and r.outputs.report:
        try:  # the report is a view of metrics.jsonl and samples/: failing to draw it never stops training
            write_reports(r.outputs.run_dir)
        except Exception as e:  # noqa: BLE001 - whatever matplotlib or the disk raises
            log.warning("could not redraw the reports in %s: %s", r.outputs.run_dir, e)
    return row


def _save(r: Run, window: Window, done: int) -> Path:
    """A checkpoint after step `done`, with the logging window and the guard's counts: a run
    resumed from it logs the rows the uninterrupted run would have."""
    loop = {"window": window.state(), "nonfinite": r.optimization.guard.state()}
    return r.outputs.checkpointer.save(done, loop)


def _interrupted(r: Run, stop: StopOnSignal, signal_name: str, done: int, path: Path) -> Interrupted:
    """The error that ends a run stopped by a signal after step `done`, saved in `path`."""
    return Interrupted(
        f"{signal_name}: stopped after step {done} of {r.cadence.n_steps}; checkpoint {path}. Continue with the "
        f"same command plus train.resume=auto hydra.run.dir={r.outputs.run_dir}",
        signum=stop.received or int(signal.Signals[signal_name]),
    )


def _benchmarks(r: Run, metrics: MetricLogger, h: HarnessConfig, last: dict[str, float]) -> Exception | None:
    """eval.harness.at_end: the tasks on the trained policy (and the reference), on the main
    process, logged as one row at the last step (and into `last`). They run before final/ is
    written, since export.merge_lora takes the policy apart in memory; what they raise is
    returned, for the loop to raise once final/ is written."""
    m = r.models
    held = functools.partial(harness.held_reference, m.eval_reference)
    run_dir, main_process = r.outputs.run_dir, r.accelerator.is_main_process
    try:
        values = harness.evaluate(h, m.unwrapped, r.data.tokenizer, held, run_dir, main_process)
    except Exception as e:  # noqa: BLE001 - raised again by the loop, after the export
        return e
    if values:
        metrics.log({"step": r.cadence.n_steps, **values})
        last.update(values)
    return None


def _finish(r: Run, last: dict[str, float]) -> None:
    """The reports and the run's summary (final/ is written by then)."""
    n_steps, run_dir, report = r.cadence.n_steps, r.outputs.run_dir, r.outputs.report
    if r.start == n_steps:
        log.info("the run had already finished at step %d; nothing left to train", n_steps)
    if r.accelerator.is_main_process:
        if report:
            write_reports(run_dir)
        log.info("%s", summary(run_dir, last, n_steps, r.outputs.generation, report=report))
    # Every process done before any tears its process group down. (How a launched process then
    # leaves, with the group DDP keeps alive: distributed.leave_launched.)
    r.accelerator.wait_for_everyone()
    r.accelerator.end_training()  # tears down the process group so processes exit cleanly
