"""The parts of a training run, as `build` makes them and the step and the loop use them: the
data, the models, the optimization, the outputs, and the cadence of logging, evaluation and
checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_cli import checkpoint
from dpo_cli.data.batching import position, step_indices
from dpo_cli.data.chat import load_template
from dpo_cli.data.tokenize import Tokenized
from dpo_cli.guard import Guard
from dpo_cli.lmhead import Head
from dpo_cli.losses import Loss
from dpo_cli.metrics import MetricLogger
from dpo_cli.reward import RewardObjective
from dpo_cli.schema import EvalConfig


@dataclass
class Data:
    """The tokenized examples and the order the run takes them in."""

    train: list[Tokenized]
    eval: list[Tokenized]
    tokenizer: Any
    batch_size: int  # examples per optimizer step, over all processes
    seed: int  # the data order is a pure function of (seed, step): resume needs no sampler state
    per_epoch: int  # optimizer steps per pass over `train`
    unit: str = "pairs"  # what an example is: "pairs", or "examples" for unpaired data
    lengths: list[int] | None = None  # tokens per training example, for train.sort_by_length

    def indices(self, step: int) -> list[int]:
        """The training examples of optimizer step `step` (from 0), the same on every process."""
        return step_indices(step, len(self.train), self.batch_size, self.seed)


@dataclass
class Models:
    """What scores a batch: the policy, the loss, the reference it may need, and how sequences
    sit in the model's rows."""

    policy: Any  # prepared by accelerate (DDP-wrapped under several processes)
    unwrapped: Any  # the policy itself, for evaluation and export
    loss: Loss | RewardObjective  # how a batch becomes a loss (the task's objective)
    reference: Any = None  # a source of reference log-probs (dpo_cli.reference), or None
    eval_reference: Any = None  # the same for the eval set (a precomputed table is per dataset)
    layout: str = "padded"  # dpo_cli.layout
    head: Head | None = None  # the policy's chunked LM head (None: full logits)
    flops: tuple[float, float] = (0.0, 0.0)  # for mfu: per trained token, per forward-only token


@dataclass
class Optimization:
    """How a step's gradients become an update."""

    optimizer: Any  # prepared by accelerate
    scheduler: Any  # stepped by hand, once per optimizer step
    guard: Guard
    micro_batch_size: int  # examples per forward pass on one process
    max_grad_norm: float | None = None  # None: no clipping (the norm is still measured)
    engine_steps: bool = False  # DeepSpeed: the engine steps the optimizer inside backward


@dataclass
class Checkpointer:
    """Writes the run's checkpoints (the whole training state, to resume from) and, at the end,
    its model in Hugging Face format."""

    accelerator: Any
    run_dir: Path
    run_shape: dict[str, Any]  # what a checkpoint must agree on to continue this run
    n_train: int  # training examples, with the batch size: the epoch a step is in
    batch_size: int
    keep: int | None = None  # train.keep_checkpoints: how many of the newest to keep (None: all)
    merge_lora: bool = False  # export.merge_lora
    chat_template: str | None = None  # data.chat_template: travels with the exported tokenizer

    def save(self, done: int, loop: dict[str, Any]) -> Path:
        """A checkpoint after optimizer step `done`, with the loop's own state `loop`."""
        epoch, batch_in_epoch = position(done, self.n_train, self.batch_size)
        state = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, **self.run_shape, "loop": loop}
        return checkpoint.save(self.accelerator, self.run_dir, done, state, self.keep)

    def path(self, done: int) -> Path:
        """Where the checkpoint of step `done` is."""
        return checkpoint.checkpoints_dir(self.run_dir) / f"step-{done}"

    def export(self, policy: Any, tokenizer: Any) -> None:
        """final/: the trained policy and its tokenizer, with the template the data was rendered with."""
        if self.chat_template:
            tokenizer.chat_template = load_template(self.chat_template)
        checkpoint.save_final(self.accelerator, policy, tokenizer, self.run_dir / "final", self.merge_lora)


@dataclass
class Outputs:
    """Where the run's results go: metric sinks, checkpoints, generation samples, reports."""

    run_dir: Path
    open_sinks: Callable[[], MetricLogger]  # the main process's sinks (none on the others), opened by the loop
    checkpointer: Checkpointer
    generation: Any = None  # evalgen.GenerationEval when a judge is configured
    eval_settings: EvalConfig = field(default_factory=EvalConfig)  # the `eval` section: generation, benchmarks
    report: bool = True  # logger.report: draw report.png and report.html
    peak_tflops: float | None = None  # logger.peak_tflops, for mfu


@dataclass(frozen=True)
class Cadence:
    """How often the loop logs, evaluates, generates and saves, in optimizer steps (None or 0:
    never; see the due-rules in dpo_cli.train)."""

    n_steps: int  # the run's length: it stops after this optimizer step
    log_every: int | None = 1
    eval_every: int | None = None
    generate_every: int | None = None
    save_every: int | None = None
    generate: bool = False  # whether generation evaluation runs at all (a judge is configured)


@dataclass
class Run:
    """Everything the training loop needs, built from the config by `build`."""

    accelerator: Any
    data: Data
    models: Models
    optimization: Optimization
    outputs: Outputs
    cadence: Cadence
    start: int = 0  # the optimizer step to start from (0, or the resumed checkpoint's)
    loop_state: dict[str, Any] = field(default_factory=dict)  # the resumed checkpoint's window and guard ({} if none)
