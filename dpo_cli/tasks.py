"""What a run trains (`task`), and all that differs between tasks: the model class the policy is
built as, how a batch becomes a loss (the objective), the layout its scoring needs, and the
settings it does not read. Build, step, loop, checkpoints, signals, sinks and reports are the
same for every task (DESIGN.md, "Tasks share the loop"); they ask the `Task` here.

- dpo: align a causal LM to the pairs with loss=... (a DPO-family loss, a reference when it needs one);
- reward: train a reward model on the pairs, `AutoModelForSequenceClassification` with one output,
  with the Bradley-Terry loss (dpo_cli/reward.py, reward.*); no reference, no generation;
- iterative: rounds of sampling from the policy, judging, pairing and DPO training on the pairs
  (dpo_cli/rounds.py, iterative.*); each round trains as task=dpo.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dpo_cli.losses.options import build_loss
from dpo_cli.reward import RewardObjective
from dpo_cli.schema import Config, as_plain, schema_default

log = logging.getLogger(__name__)

PADDED_REASON = (
    "task=reward: a sequence's reward is the score at its last token, which the model's own pooling "
    "reads from one sequence per row"
)


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # the transformers class the policy is built as
    lora_task_type: str  # peft's task type (what trains beside the adapters)
    num_labels: int | None = None  # outputs of a classification head (None: a causal LM's own head)
    layout: str | None = None  # the layout its scoring needs (None: dpo_cli.layout chooses)
    layout_why: str = ""  # why it needs it, for the log and the refusal of another
    # Config sections and keys the task does not read: refused when given on the command line,
    # and said in the log when a group or a default set them (reference settings: refused).
    unused: tuple[str, ...] = ()

    @property
    def reads_loss(self) -> bool:
        """Whether loss=... is its objective (else: the task's own, and no reference)."""
        return "loss" not in self.unused

    def objective(self, cfg: Config) -> Any:
        """How a batch becomes a loss: the loss=... object, or the task's own objective."""
        if self.name == "reward":
            return RewardObjective(cfg.reward.center_coefficient)
        return build_loss(cfg.loss)


TASKS = {
    "dpo": Task("dpo", "AutoModelForCausalLM", "CAUSAL_LM"),
    "reward": Task(
        "reward",
        "AutoModelForSequenceClassification",
        "SEQ_CLS",
        num_labels=1,
        layout="padded",
        layout_why=PADDED_REASON,
        unused=("loss", "judge", "eval", "model.warm_start", "train.logits_chunk"),
    ),
    "iterative": Task("iterative", "AutoModelForCausalLM", "CAUSAL_LM"),
}


def of(cfg: Config) -> Task:
    return TASKS[cfg.task]


def _key(override: str) -> tuple[str, str]:
    """(dotted key or group, value) of a command-line override (`+k=v`, `~k`, `k@pkg=v`)."""
    key, _, value = override.lstrip("+~").partition("=")
    return key.split("@")[0], value


def _given(override: str, section: str) -> bool:
    """Whether `override` sets `section` or a key inside it (judge=none is no judge: allowed)."""
    key, value = _key(override)
    if section == "judge" and key == "judge" and value in ("none", "null"):
        return False
    if section == "model.warm_start" and key == "model.warm_start.steps" and value == "0":
        return False
    return key == section or key.startswith(section + ".")


def problems(c: Config, command_line: Sequence[str] = (), unpaired: bool = False) -> list[str]:
    """What the task refuses in this config, before any weights load: `command_line` (the
    overrides given) setting what it does not read, data or settings it cannot train with."""
    task = of(c)
    if task.name != "reward":
        coefficient = c.reward.center_coefficient
        p = [f"reward.center_coefficient={coefficient} is read by task=reward only; remove it"] if coefficient else []
        if task.name == "iterative":
            return p + iterative_problems(c, unpaired, command_line)
        return p + [
            f"{o}: iterative.* is read by task=iterative only; add task=iterative, or remove it"
            for o in command_line
            if _given(o, "iterative")
        ]
    p = [
        f"{o}: task={task.name} does not read {section} (it trains with the Bradley-Terry loss, reward.*); remove it"
        for o in command_line
        for section in task.unused
        if _given(o, section)
    ]
    if c.reward.center_coefficient is not None and c.reward.center_coefficient < 0:
        p.append(f"reward.center_coefficient={c.reward.center_coefficient} must be >= 0 (null or 0 = off)")
    if unpaired:
        p.append(
            "task=reward trains on pairs (chosen, rejected); this data holds unpaired examples: choose paired data"
        )
    p += _reference_problems(c)
    if c.train.layout not in ("auto", task.layout):
        p.append(f"train.layout={c.train.layout}: {task.layout_why}; set train.layout=padded (or auto)")
    return p


def _reference_problems(c: Config) -> list[str]:
    """Reference settings, which a task with its own objective would ignore: refused."""
    given = {k: v for k, v in as_plain(c.reference).items() if v != schema_default(f"reference.{k}", v)}
    return [f"reference.{k}={v!r}: task={c.task} loads no reference model; remove it" for k, v in given.items()]


def settle(c: Config, quiet: bool = False) -> None:
    """The settings the task does not read, which groups or defaults set (the command line's
    are refused by `problems`): said in the log, and the judge and warm start turned off so that
    nothing builds them."""
    task = of(c)
    if task.name != "reward":
        return
    unused = [f"the loss section (loss: {type(c.loss).__name__.removesuffix('Options')})"]
    if c.model.warm_start.steps:
        unused.append(f"model.warm_start (steps {c.model.warm_start.steps}: it fine-tunes a causal LM)")
        c.model.warm_start.steps = 0
    if c.judge is not None:
        unused.append(f"the judge ({type(c.judge).__name__.removesuffix('Options')}) and generation evaluation")
        c.judge = None
    if not quiet:
        log.info(
            "task=reward: a reward model (%s, one output) trained with the Bradley-Terry loss "
            "(reward.center_coefficient=%s); not used: %s",
            task.auto_class,
            c.reward.center_coefficient,
            "; ".join(unused),
        )


def iterative_problems(c: Config, unpaired: bool, command_line: Sequence[str] = ()) -> list[str]:
    """task=iterative's settings, and what it cannot run with (before any weights load);
    eval.generate_every, which a default sets, is refused when `command_line` gives it."""
    from dpo_cli.distributed import world_size_from_env
    from dpo_cli.modeling.options import choice, positive
    from dpo_cli.schema import PAIR_RULES, ROUND_REFERENCES

    it = c.iterative
    p = positive("iterative.rounds", it.rounds) + positive("iterative.prompts", it.prompts, allow_none=True)
    p += positive("iterative.temperature", it.temperature) + positive("iterative.max_new_tokens", it.max_new_tokens,
                                                                        allow_none=True)  # fmt: skip
    p += positive("iterative.rounds_per_job", it.rounds_per_job, allow_none=True)
    p += choice("iterative.pairs", it.pairs, PAIR_RULES) + choice("iterative.reference", it.reference, ROUND_REFERENCES)
    if not isinstance(it.samples, int) or it.samples < 2:
        p.append(f"iterative.samples={it.samples} must be >= 2: a pair needs two responses to one prompt")
    if it.min_gap < 0:
        p.append(f"iterative.min_gap={it.min_gap} must be >= 0 (ties are always dropped)")
    if not 0 < it.top_p <= 1:
        p.append(f"iterative.top_p={it.top_p} must be in (0, 1]")
    if c.judge is None:
        p.append(
            "task=iterative scores the policy's samples with a judge, and none is set: choose one (judge=sort with "
            "data=synthetic, judge=reward_model judge.name_or_path=DIR, e.g. a task=reward run's final/)"
        )
    if unpaired or not _paired_loss(c):
        p.append("task=iterative trains a paired DPO-family loss on pairs of its samples: choose paired data and loss")
    if c.train.resume not in (None, "auto"):
        p.append(f"train.resume={c.train.resume!r}: task=iterative resumes its rounds with train.resume=auto")
    if any(_given(o, "eval.generate_every") for o in command_line):
        p.append(
            "eval.generate_every: task=iterative evaluates generation after each round (eval.prompts held-out "
            "prompts against the initial policy); remove it"
        )
    if world_size_from_env() > 1:
        p.append(
            f"task=iterative runs in one process for now ({world_size_from_env()} launched): launch it without "
            "accelerate launch / torchrun (one GPU or the CPU), or train each round's pairs with task=dpo"
        )
    return p


def _paired_loss(c: Config) -> bool:
    try:
        return bool(getattr(build_loss(c.loss), "paired", True))
    except Exception:  # noqa: BLE001 - a loss that cannot be built: the loss's own checks say why
        return True
