"""`train_step`: one optimizer step, micro batches to update, with the non-finite guard."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from dpo_cli.data.batching import micro_batches
from dpo_cli.data.collate import chosen_token_means
from dpo_cli.errors import UserError
from dpo_cli.launch import grad_norm_of
from dpo_cli.parts import Data, Models, Optimization
from dpo_cli.scoring import Averages, batch_loss, make_batch
from dpo_cli.throughput import Window

log = logging.getLogger(__name__)


def train_step(
    accelerator: Any, data: Data, models: Models, opt: Optimization, step: int, window: Window
) -> tuple[torch.Tensor | None, float]:
    """Optimizer step `step` (from 0): forward and backward over this process's micro batches
    of the step's examples (gradients accumulate), the gradient norm clipped, then the update.
    The guard: a non-finite loss or gradient norm on any process skips the update on all, and
    is counted in `opt.guard`. `window` gets the step's metrics (unless skipped), its tokens and
    its seconds. Returns the gradient norm (None where the launcher reports none) and the
    learning rate of the step."""
    started = time.perf_counter()
    indices = data.indices(step)
    parts, finite = _forward_backward(accelerator, data, models, opt.micro_batch_size, indices, window)
    max_norm = opt.max_grad_norm if opt.max_grad_norm is not None else float("inf")
    grad_norm = grad_norm_of(accelerator.clip_grad_norm_(models.policy.parameters(), max_norm), accelerator.device)
    lr = float(opt.scheduler.get_last_lr()[0])  # torchao's optimizers keep it as a tensor
    # The guard: a non-finite loss or gradient norm on any process skips the update on all.
    # (Under DeepSpeed the engine has already stepped inside backward: the guard counts.)
    if grad_norm is not None:
        finite = finite * torch.isfinite(grad_norm)
    if opt.guard.check(accelerator, finite):
        _update(accelerator, opt, lr)
        window.metrics.add(parts.parts)
    else:
        _skip(accelerator, opt)
        log.warning(
            "step %d: non-finite loss or gradient norm (%s); update skipped on every process "
            "(%d in a row); the step's pairs: %s",
            step + 1, grad_norm, opt.guard.consecutive, sorted(indices),
        )  # fmt: skip
    opt.optimizer.zero_grad(set_to_none=True)
    window.steps += 1
    window.seconds += time.perf_counter() - started
    return grad_norm, lr


def _forward_backward(
    accelerator: Any, data: Data, models: Models, micro_batch_size: int, indices: list[int], window: Window
) -> tuple[Averages, torch.Tensor]:
    """Forward and backward passes over this process's micro batches of one optimizer step
    (`indices`: the step's examples); gradients accumulate. Returns the step's metric parts and
    whether every loss was finite (1 or 0)."""
    shards = micro_batches(
        indices, accelerator.process_index, accelerator.num_processes, micro_batch_size, data.lengths
    )
    step_parts, finite = Averages(), torch.ones((), device=accelerator.device)
    # A token-mean NLL term divides by the whole step's tokens (every process sees the step's
    # indices), not each micro batch's: the split of the batch then changes nothing.
    token_means = chosen_token_means([data.train[i] for i in indices])

    def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
        # A batch statistic a loss uses (KTO's KL estimate): every process joins this reduce on
        # every micro batch, since all of them step through the same number of micro batches.
        return accelerator.reduce(x, "mean")

    # accelerate counts micro batches to decide when to synchronize; a step starts from zero
    # (a checkpoint restores its counter, which another number of processes would misalign).
    accelerator.step = 0
    for idx in shards:
        batch = make_batch(data.train, idx, data.tokenizer.pad_token_id, models.loss, accelerator.device, models.layout)
        # accelerate owns accumulation (configured with the step's micro batches per process, see
        # launch.accumulation_plugin): gradients synchronize only on the step's last micro
        # batch, and backward divides each micro batch's mean loss by their number, so that the
        # accumulated gradient is the mean over this process's share; the all-reduce (DDP, FSDP,
        # DeepSpeed) then averages over processes.
        with accelerator.accumulate(models.policy), accelerator.autocast():
            loss, parts = batch_loss(
                models.policy, models.reference, models.loss, batch, mean_over_processes, models.head, token_means
            )
            accelerator.backward(loss)
        step_parts.add(parts)
        finite *= torch.isfinite(loss.detach()).all()
        window.add_tokens(batch)
    return step_parts, finite


def _update(accelerator: Any, opt: Optimization, lr: float) -> None:
    """The optimizer's step, and the schedule's unless the step did not happen (an fp16 overflow
    the loss scaler caught). A learning rate whose step size does not fit the parameters' dtype
    (Adam at lr 1e38: lr / (1 - beta1) overflows float32 inside torch) is told as such."""
    try:
        opt.optimizer.step()
    except RuntimeError as e:
        if "without overflow" not in str(e):
            raise
        raise UserError(
            f"the optimizer's step size at learning rate {lr:g} overflows the weights' dtype ({e}); lower optimizer.lr"
        ) from None
    if not accelerator.optimizer_step_was_skipped:
        opt.scheduler.step()


def _skip(accelerator: Any, opt: Optimization) -> None:
    """A skipped step, where the launcher needs to see it: under fp16 the loss scaler sees the
    inf, skips the update itself and lowers its scale for the next step; DeepSpeed stepped
    inside backward, so the schedule steps too, to stay in line with it."""
    if accelerator.scaler is not None:
        opt.optimizer.step()
    if opt.engine_steps:
        opt.scheduler.step()
