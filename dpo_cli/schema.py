"""The config's schema: the root `Config`, its small sections with their checks, and what reads it.

One dataclass per section, registered in Hydra's ConfigStore (by `config.register_configs`):
an unknown key or a wrongly typed value fails when Hydra composes the config, and
`OmegaConf.to_object` at the entry point turns the composed config into these objects, which
every part then reads by attribute. The meaning of each key is said beside it; the YAML files
under `conf/` hold only the values that differ from these defaults. Sections with their own
module keep their dataclass and checks there (`modeling.options`: model, reference;
`data.options`: data; the loss, optimizer, judge and data format nodes get theirs generated
from their class, `options`). What one section cannot check alone (the loss against the data,
fp16 against the model's dtype) is `config.validate`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from dpo_cli.batch import LAYOUTS
from dpo_cli.data.options import RENAMED, DataConfig
from dpo_cli.modeling.options import ModelConfig, ReferenceConfig, choice, positive
from dpo_cli.schedule import NAMES as SCHEDULES

MODES = ("train", "inspect", "eval")
TASKS = ("dpo", "reward", "iterative")  # what a run trains (dpo_cli/tasks.py)
PRECISIONS = ("auto", "no", "bf16", "fp16")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class InspectConfig:
    """mode=inspect (the preflight)."""

    export: Optional[str] = (
        None  # write the normalized pairs (the text then tokenized) to this JSONL file; null = no export
    )
    overwrite: bool = False  # true: inspect.export may replace an existing file (never the input data)
    examples: int = 3  # how many tokenized examples the report shows, with prompt/response boundaries marked


@dataclass
class ExportConfig:
    """What final/ holds at the end of a run, and where it is pushed."""

    merge_lora: bool = False  # with LoRA: also write the base model with the adapter merged in, to final/merged/
    # After final/ (model or adapter, tokenizer, README.md model card) is written, upload it to this Hub
    # model repo, e.g. your-name/model-name; checked at start-up (offline, token, Hub reachable). null = no push
    push_to_hub: Optional[str] = None
    hub_private: bool = True  # create the repo private (as the safe default); an existing repo keeps its visibility
    hub_revision: Optional[str] = None  # branch to push to (created from main when missing); null = main


@dataclass
class SchedulerConfig:
    """The learning rate: linear warmup to optimizer.lr, then `name`'s decay (dpo_cli/schedule.py)."""

    name: str = "cosine"  # cosine (to 0 at the last step), linear, constant (no decay), constant_with_warmup
    warmup_steps: Optional[int] = None  # warmup length in optimizer steps; null = use warmup_ratio
    warmup_ratio: float = 0.1  # warmup length as a fraction of all optimizer steps, in [0, 1)


@dataclass
class TrainConfig:
    """The training loop (dpo_cli/train.py); sizes in pairs, lengths in optimizer steps."""

    batch_size: int = 64  # global batch, in pairs per optimizer step (= micro_batch_size x accumulation x processes)
    micro_batch_size: int = 8  # pairs per forward pass per process; lower it when memory runs out
    max_steps: Optional[int] = None  # optimizer steps to train; null = train.epochs passes over the training pairs
    epochs: int = 1  # passes over the training pairs, used when max_steps is null
    eval_every: Optional[int] = 100  # evaluate every N optimizer steps (and always at the end); null = only at the end
    save_every: Optional[int] = 500  # write checkpoints/step-N every N steps; null = never (final/ is always written)
    keep_checkpoints: Optional[int] = 2  # how many of the newest checkpoints to keep; null = all
    resume: Optional[str] = (
        None  # null = start fresh; auto = latest complete checkpoint in the run dir; or a checkpoints/step-N path
    )
    seed: int = 42  # seeds model init, data order and every RNG
    # auto (bf16 on a GPU that has it, else no: resolved when the config is validated), no, bf16 or fp16
    # (autocast through accelerate; weights stay in model.dtype)
    mixed_precision: str = "auto"
    max_grad_norm: Optional[float] = (
        1.0  # clip the global gradient norm to this; null = no clipping (the norm is still logged)
    )
    max_nonfinite_steps: Optional[int] = 10  # a NaN/inf step is skipped; stop after this many in a row (null = never)
    # How sequences sit in the model's rows: auto (the fastest exact one the attention back-end supports),
    # shared (packed, each prompt once for both responses), packed (several sequences per row), padded (one per row).
    layout: str = "auto"
    logits_chunk: Optional[int] = (
        1024  # the LM head runs on scored positions only, this many at a time; null = the model's full logits
    )
    sort_by_length: bool = (
        True  # within a step, micro batches and processes get pairs of similar length (the step's pairs do not change)
    )
    compile: bool = False  # torch.compile the policy's decoder blocks (dpo_cli/compiling.py); off until measured to pay


@dataclass
class WandbConfig:
    """Weights & Biases (wandb.init arguments)."""

    mode: str = "online"  # online, offline or disabled; online without an API key falls back to offline
    project: str = "dpo-cli"  # W&B project
    entity: Optional[str] = None  # W&B team or user; null = your default entity
    name: Optional[str] = None  # run name; null = the run directory's name
    group: Optional[str] = None  # W&B group, e.g. for the jobs of one sweep
    tags: list[str] = field(default_factory=list)  # W&B tags


@dataclass
class MlflowConfig:
    """MLflow tracking (its client API): one MLflow run per run directory, continued on resume."""

    enabled: bool = False  # log every metrics row (as metrics) and the config (as params) to MLflow
    tracking_uri: Optional[str] = (
        None  # null = file:<run dir>/mlruns (a local file store); http(s)://host:port = a server; a relative path = relative to the run dir
    )
    experiment: str = "dpo-cli"  # MLflow experiment (created when missing)
    run_name: Optional[str] = None  # MLflow run name; null = the run directory's name


@dataclass
class LoggerConfig:
    """Metrics go to <run dir>/metrics.jsonl, a console progress bar, Weights & Biases, and
    optionally TensorBoard and MLflow (dpo_cli/tracking.py)."""

    log_every: int = (
        1  # write a train metrics row every N optimizer steps (pair metrics and throughput averaged over them)
    )
    progress: bool = True  # show a progress bar (step, loss, accuracy, ETA) on the console
    report: bool = True  # draw report.png and report.html (curves, samples) after each evaluation and at the end
    peak_tflops: Optional[float] = (
        None  # the device's peak TFLOP/s per process at the run's precision, for `mfu`; null = not logged
    )
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = (
        False  # write TensorBoard event files (scalars per metrics row, the config as text) to <run dir>/tensorboard/
    )
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class HarnessConfig:
    """Benchmarks through EleutherAI's lm-evaluation-harness (dpo_cli/harness.py), on the model in memory."""

    tasks: list[str] = field(default_factory=list)  # lm_eval task, group or tag names (`lm-eval ls tasks`); empty = off
    include_path: Optional[str] = None  # a directory of your own task YAMLs (e.g. examples/harness); null = none
    num_fewshot: Optional[int] = None  # examples shown before each question; null = each task's own default
    limit: Optional[int] = None  # score only the first N examples of each task (a quick check); null = all
    batch_size: int = 8  # requests per forward pass
    reference: bool = False  # true: also evaluate the reference (metrics harness_ref/...), for a before/after table
    at_end: bool = False  # true: mode=train runs the tasks on the trained policy after its last step


@dataclass
class EvalConfig:
    """Generation evaluation (with a judge): responses to held-out prompts from the policy and the
    reference, judged pairwise."""

    generate_every: Optional[int] = (
        None  # generate and judge every N steps, and always at the end; null = at the end only (needs a judge)
    )
    prompts: int = 64  # held-out prompts (the first N distinct prompts of the eval split); 0 = no generation evaluation
    max_new_tokens: int = 256  # longest response, in tokens (a response that reaches it counts as unfinished)
    temperature: float = 1.0  # sampling temperature; 0 = greedy decoding
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability; 1.0 = all
    seed: int = 0  # seeds the sampling (batch k of prompts uses seed + k: the same samples on any number of processes)
    batch_size: int = 16  # prompts per generate() call, per process (with the KV cache)
    confidence: float = 0.95  # level of the win rate's confidence interval (Wilson score interval over prompts)
    harness: HarnessConfig = field(default_factory=HarnessConfig)  # benchmarks (lm-evaluation-harness); off by default


@dataclass
class RewardConfig:
    """task=reward: a reward model trained on the pairs with the Bradley-Terry loss (dpo_cli/reward.py)."""

    # Weight of the auxiliary loss mean((r_chosen + r_rejected)^2), which centres the rewards on 0
    # (Eisenstein et al., 2023; TRL's center_rewards_coefficient, e.g. 0.01); null or 0 = off
    center_coefficient: Optional[float] = None


PAIR_RULES = ("best_worst", "all")  # how a prompt's scored samples become pairs (dpo_cli/pairing.py)
ROUND_REFERENCES = ("previous", "initial")


@dataclass
class IterativeConfig:
    """task=iterative: rounds of sample -> judge -> pair -> train (dpo_cli/rounds.py). Each round
    trains as a task=dpo run with the train section as given (train.max_steps steps, or
    train.epochs passes over the round's pairs)."""

    rounds: int = 3  # rounds of sampling, judging and training
    prompts: Optional[int] = 1024  # prompts sampled per round (the next N of the shuffled training prompts); null = all
    samples: int = 4  # responses sampled per prompt (k)
    pairs: str = "best_worst"  # best_worst: one pair per prompt (highest vs lowest score); all: every two samples apart by min_gap
    min_gap: float = (
        0.0  # keep a pair only when chosen's score - rejected's >= min_gap (ties, gap 0, are always dropped)
    )
    reference: str = (
        "previous"  # previous: each round's reference is the policy it starts from; initial: round 1's, every round
    )
    temperature: float = 1.0  # sampling temperature of the rounds' responses (> 0)
    top_p: float = 1.0  # nucleus sampling of the rounds' responses; 1.0 = off
    max_new_tokens: Optional[int] = None  # longest sampled response, in tokens; null = eval.max_new_tokens
    rounds_per_job: Optional[int] = (
        None  # stop after this many rounds and leave rounds/pending for the next job (SLURM chains); null = all
    )


@dataclass
class Config:
    mode: str = "train"  # train; inspect (validate, tokenize and report the data; no weights); eval (evaluate model.name_or_path)
    task: str = "dpo"  # dpo (align the policy to the pairs, loss=...); reward (a reward model, reward.*); iterative (rounds, iterative.*)
    reward: RewardConfig = field(default_factory=RewardConfig)
    iterative: IterativeConfig = field(default_factory=IterativeConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # `_target_` nodes typed by their class's generated options (dpo_cli/options.py, conf/loss/,
    # conf/optimizer/, conf/judge/); a judge of null = no generation evaluation.
    loss: Any = MISSING
    optimizer: Any = MISSING
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: Any = None


# --- each section's own checks -------------------------------------------------------------------


def scheduler_problems(s: SchedulerConfig, max_steps: int | None) -> list[str]:
    p = choice("scheduler.name", s.name, SCHEDULES)
    if s.warmup_steps is not None and s.warmup_steps < 0:
        p.append(f"scheduler.warmup_steps={s.warmup_steps} must be >= 0")
    if not 0 <= s.warmup_ratio < 1:
        p.append(f"scheduler.warmup_ratio={s.warmup_ratio} must be in [0, 1)")
    if max_steps and s.warmup_steps is not None and s.warmup_steps >= max_steps:
        p.append(
            f"scheduler.warmup_steps={s.warmup_steps} is not below train.max_steps={max_steps}: "
            "the learning rate would never reach optimizer.lr"
        )
    return p


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit (set_seed seeds numpy, random and torch)


def train_problems(t: TrainConfig) -> list[str]:
    p = positive("train.batch_size", t.batch_size) + positive("train.micro_batch_size", t.micro_batch_size)
    if t.batch_size > 0 and t.micro_batch_size > 0 and t.batch_size % t.micro_batch_size:
        p.append(
            f"train.batch_size={t.batch_size} must be a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} (x the number of processes)"
        )
    for key in ("max_steps", "eval_every", "save_every", "keep_checkpoints", "max_grad_norm", "max_nonfinite_steps"):
        p += positive(f"train.{key}", getattr(t, key), allow_none=True)
    p += positive("train.epochs", t.epochs) + positive("train.logits_chunk", t.logits_chunk, allow_none=True)
    p += choice("train.mixed_precision", t.mixed_precision, PRECISIONS)
    p += choice("train.layout", t.layout, ("auto", *LAYOUTS))  # auto: dpo_cli.layout.choose
    if not 0 <= t.seed <= SEED_MAX:
        p.append(f"train.seed={t.seed} must be in [0, 2**32 - 1] (numpy's seed range); set e.g. train.seed=42")
    return p


def logger_problems(lg: LoggerConfig, save_every: int | None) -> list[str]:
    p = positive("logger.log_every", lg.log_every) + positive("logger.peak_tflops", lg.peak_tflops, allow_none=True)
    if save_every and lg.log_every > 0 and save_every % lg.log_every:
        p.append(
            f"train.save_every={save_every} must be a multiple of logger.log_every={lg.log_every}, so that "
            "a resumed run logs the same averaged rows as an uninterrupted one"
        )
    return p + choice("logger.wandb.mode", lg.wandb.mode, WANDB_MODES)


def eval_problems(e: EvalConfig, has_judge: bool) -> list[str]:
    p = positive("eval.generate_every", e.generate_every, allow_none=True)
    if not has_judge and e.generate_every is not None:
        p.append(
            f"eval.generate_every={e.generate_every} needs a judge to compare the policy's responses with the "
            "reference's: choose one (judge=reward_model judge.name_or_path=..., or judge=sort for data=synthetic), "
            "or remove eval.generate_every"
        )
    p += positive("eval.max_new_tokens", e.max_new_tokens) + positive("eval.batch_size", e.batch_size)
    if e.prompts < 0:
        p.append(f"eval.prompts={e.prompts} must be >= 0 (0 = no generation evaluation)")
    if e.temperature < 0:
        p.append(f"eval.temperature={e.temperature} must be >= 0 (0 = greedy decoding)")
    if not 0 < e.top_p <= 1:
        p.append(f"eval.top_p={e.top_p} must be in (0, 1]")
    if not 0 < e.confidence < 1:
        p.append(f"eval.confidence={e.confidence} must be in (0, 1), e.g. 0.95")
    return p


def harness_problems(h: HarnessConfig, mode: str) -> list[str]:
    """eval.harness's values; the task names and their datasets are `harness.task_problems`'s."""
    p = positive("eval.harness.batch_size", h.batch_size) + positive("eval.harness.limit", h.limit, allow_none=True)
    if h.num_fewshot is not None and h.num_fewshot < 0:
        p.append(f"eval.harness.num_fewshot={h.num_fewshot} must be >= 0 (null = each task's default)")
    for key in ("reference", "at_end"):
        if getattr(h, key) and not h.tasks:
            p.append(f"eval.harness.{key}=true needs tasks to run: set eval.harness.tasks=[TASK,...], or remove it")
    if h.tasks and mode == "train" and not h.at_end:
        p.append(
            f"eval.harness.tasks={list(h.tasks)} is set, but mode=train runs the harness only with "
            "eval.harness.at_end=true (after the last step); set it, or evaluate final/ later with mode=eval"
        )
    return p


def as_plain(value: Any) -> Any:
    """The typed config (or any part of it) as plain dicts, lists and scalars, `_target_` kept."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return value


# Keys an earlier version spelled otherwise: old dotted prefix -> new (cli.old_spellings rewrites
# them on the command line; checkpoint.compat and config.saved_config read a checkpoint's recorded settings through them).
RENAMED_KEYS: dict[str, str] = {**RENAMED}  # data: a format's own keys moved into data.format


def renamed(flat_key: str) -> str:
    """`flat_key` as this version spells it (RENAMED_KEYS: an old dotted prefix -> the new one)."""
    for old, new in RENAMED_KEYS.items():
        if flat_key == old or flat_key.startswith(old + "."):
            return new + flat_key[len(old) :]
    return flat_key


def schema_default(key: str, missing: Any) -> Any:
    """The schema's default for a dotted key (e.g. train.seed), or `missing` if it has none."""
    node: Any = OmegaConf.structured(Config)
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node or OmegaConf.is_missing(node, part):
            return missing
        node = node[part]
    return OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
