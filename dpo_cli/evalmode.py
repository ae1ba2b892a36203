"""`mode=eval`: evaluate a saved model against its reference, without training.

    dpo-train mode=eval model.name_or_path=outputs/RUN/final          # against that run's reference
    dpo-train mode=eval model.name_or_path=A/final reference.name_or_path=B/final judge=...  # A vs B
    dpo-train mode=eval task=reward model.name_or_path=outputs/RUN/final  # a reward model (task=reward)

The model is a full model directory or a LoRA adapter (final/ of a LoRA run). A reward model
(task=reward) has no reference: its Bradley-Terry loss, accuracy, margin and rewards are computed
on the data's eval split as the run's own evaluation computes them. A policy's reference:
reference.name_or_path when set; else, for an adapter, its base model (the adapter switched
off); else, for a dpo-cli run's final/, the reference that run trained against (its
reference.name_or_path, or its initial policy, rebuilt from the run's saved config: the same
weights, or the same seed and warm start). The held-out preference metrics of `loss` are
computed on the data's eval split, and, with a judge, the generation metrics. Results go to
the run directory's metrics.jsonl (one row, step 0), eval.json, samples/, the reports, W&B, and
the console. With eval.harness.tasks, lm-evaluation-harness benchmarks run on the policy (and
the reference) in memory too (dpo_cli/harness.py): their metrics join the row, lm_eval's
output goes to harness/. That directory is the evaluation's own: one that holds a training run's files is
refused before Hydra writes anything there (`check_output_dir`), so that a run's metrics,
reports and samples never change after it has run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpo_cli import checkpoint, config, evalgen, harness, layout, recorded, rundir, tasks, tracking
from dpo_cli.data.prepare import prepare
from dpo_cli.data.tokenize import Tokenized
from dpo_cli.errors import ConfigError, UserError
from dpo_cli.evaluate import evaluate
from dpo_cli.losses import Loss
from dpo_cli.metrics import JsonlSink, MetricLogger, WandbSink, resolve_wandb_mode
from dpo_cli.modeling import load_model, load_tokenizer
from dpo_cli.modeling.options import ModelConfig
from dpo_cli.recap import summary
from dpo_cli.reference import AdapterReference, ModelReference, check_reference_tokenizer, generating_model
from dpo_cli.report import write_reports
from dpo_cli.reward import RewardObjective, check_margins
from dpo_cli.schema import Config

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: str | None) -> str | None:
    """The base model a saved LoRA adapter directory names, or None when `path` is no adapter."""
    if path is None or not (Path(path).expanduser() / ADAPTER_CONFIG).is_file():
        return None
    base = json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError([f"{path}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)"])
    return base


def _section(model: ModelConfig, name_or_path: str) -> ModelConfig:
    """A copy of model section `model` loading `name_or_path` (pretrained weights, no LoRA)."""
    return dataclasses.replace(
        model, name_or_path=name_or_path, random_init=None, gguf_file=None, gradient_checkpointing=False,
        lora=dataclasses.replace(model.lora, r=None), warm_start=dataclasses.replace(model.warm_start, steps=0),
    )  # fmt: skip


def load_saved(model: ModelConfig, path: str, tokenizer: Any, task: tasks.Task = tasks.TASKS["dpo"]) -> Any:
    """The model saved at `path` as `task`'s model class (a causal LM; a reward model for
    task=reward): a full model directory (or hub id), or a LoRA adapter over the base its
    adapter_config.json names (a peft model, adapter active)."""
    base = adapter_base(path)
    if base is None:
        return load_model(_section(model, path), tokenizer, 0, task.auto_class, task.num_labels)
    from peft import PeftModel

    inner = load_model(_section(model, base), tokenizer, 0, task.auto_class, task.num_labels)
    return PeftModel.from_pretrained(inner, path, is_trainable=False)


TRAINING_OUTPUTS = ("final", "checkpoints", "warm_start")


def _saved_mode(run_dir: Path) -> str | None:
    """The `mode` of the run whose config `run_dir/.hydra/config.yaml` is; None without one.
    A config that cannot be read counts as a training run's (the safe side)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        return str(OmegaConf.load(path).get("mode", "train"))
    except Exception:  # noqa: BLE001 - any damage: keep away from it
        return "train"


def training_run_files(run_dir: Path) -> list[str]:
    """What in `run_dir` shows that a training run wrote there: its outputs (final/,
    checkpoints/, warm_start/), its saved config (mode=train), or, without a saved config,
    metrics rows that no evaluation wrote."""
    found = [f"{name}/" for name in TRAINING_OUTPUTS if (run_dir / name).exists()]
    mode = _saved_mode(run_dir)
    if mode == "train":
        found.append(".hydra/config.yaml (mode=train)")
    elif mode is None and (run_dir / "metrics.jsonl").is_file() and not (run_dir / "eval.json").is_file():
        found.append("metrics.jsonl")
    return found


def check_output_dir(run_dir: Path | str) -> None:
    """Refuse to evaluate into a training run's directory: the evaluation's metrics row,
    reports and reference samples would change that run's own. Called before Hydra writes its
    .hydra/ and train.log there (`overrides.check`), and again by `run`."""
    found = training_run_files(Path(run_dir))
    if found:
        raise UserError(
            f"mode=eval writes its results (metrics.jsonl, eval.json, samples/, reports) into hydra.run.dir, and "
            f"{run_dir} holds a training run ({', '.join(found)}), whose files must not change; give the evaluation "
            "a directory of its own: a new hydra.run.dir=DIR, or none (a fresh one under outputs/)"
        )


def run_dir_of_final(path: str) -> Path | None:
    """The dpo-cli run directory whose final/ (or checkpoint) `path` is, if any."""
    for parent in list(Path(path).expanduser().resolve().parents)[:3]:
        if (parent / ".hydra" / "config.yaml").is_file():
            return parent
    return None


def run_config_of(path: str) -> Config | None:
    """The saved config of the dpo-cli run whose final/ (or checkpoint) `path` is, if any."""
    run_dir = run_dir_of_final(path)
    return recorded.saved_config(run_dir / ".hydra" / "config.yaml") if run_dir is not None else None


def _unfinished(path: str) -> str | None:
    """Why `path`, a dpo-cli run directory or its final/, is no model to evaluate (the run did
    not finish, or the directory stands for its final/), or None."""
    given = Path(path).expanduser().resolve()
    run = next((d for d in (given, given.parent) if (d / ".hydra" / "config.yaml").is_file()), None)
    if run is None or given not in (run, run / "final"):
        return None
    final = run / "final"
    if final.is_dir():
        directory = f"{run} is a dpo-cli run directory: evaluate its final/, model.name_or_path={final}"
        return None if given == final else directory
    done = checkpoint.complete_checkpoints(run)
    how = (
        f"its latest checkpoint is {done[-1]}: continue the run with train.resume=auto hydra.run.dir={run} to write "
        f"final/, then evaluate {final}"
        if done
        else "it saved no checkpoint to continue from"
    )
    return f"{run} is a dpo-cli run whose final/ is missing (the run did not finish); {how}"


def check_reference_known(cfg: Config) -> None:
    """Refuse, before any weights load, a model whose reference cannot be found."""
    path = cfg.model.name_or_path
    unfinished = _unfinished(path) if path is not None else None
    if unfinished:
        raise ConfigError([f"mode=eval: model.name_or_path={path!r}: {unfinished}"])
    if cfg.reference.name_or_path is None and adapter_base(path) is None and run_config_of(path) is None:
        raise ConfigError(
            [
                f"mode=eval: the reference of model.name_or_path={path!r} is unknown (it is neither a dpo-cli run's "
                "final/ nor a LoRA adapter); set reference.name_or_path to the model it was trained from (e.g. the "
                "SFT model)"
            ]
        )


def _reference(cfg: Config, policy: Any, tokenizer: Any) -> tuple[Any, str]:
    """The reference source for mode=eval and what it is (see the module docstring)."""
    path = cfg.model.name_or_path
    if cfg.reference.name_or_path is not None:
        check_reference_tokenizer(cfg, tokenizer)
        model = load_saved(cfg.model, cfg.reference.name_or_path, tokenizer)
        return ModelReference(
            model, f"{cfg.reference.name_or_path} (reference.name_or_path)"
        ), cfg.reference.name_or_path
    if adapter_base(path) is not None:
        return AdapterReference(policy, adapter_off=True), "the adapter's base model (adapter off)"
    run_cfg = run_config_of(path)
    assert run_cfg is not None  # check_reference_known
    if run_cfg.reference.name_or_path is not None:
        name = run_cfg.reference.name_or_path
        return ModelReference(load_saved(cfg.model, name, tokenizer), f"{name} (the run's reference)"), name
    # The run's initial policy, rebuilt as that run built it: same weights, or same seed and warm start.
    from dpo_cli.warmstart import warm_started

    initial = load_model(run_cfg.model, tokenizer, run_cfg.train.seed)
    if run_cfg.model.warm_start.steps:  # runs of earlier versions had none (the default: 0)
        saved = run_dir_of_final(path) / "warm_start"
        train_set = [] if saved.is_dir() else prepare(run_cfg.data, tokenizer, run_cfg.train.seed, check=False).train
        warm_started(initial, train_set, run_cfg.model.warm_start, run_cfg.train.seed, tokenizer.pad_token_id, saved,
                     main_process=False)  # fmt: skip
    what = f"the initial policy of the run that wrote {path} (seed {run_cfg.train.seed})"
    return ModelReference(initial, what), what


def run(cfg: Config, run_dir: Path) -> dict[str, float]:
    """Evaluate model.name_or_path (the config validated and typed); return the eval row."""
    from accelerate import Accelerator

    from dpo_cli.distributed import cpu_only

    if cfg.model.name_or_path is None:
        raise ConfigError(["mode=eval evaluates a saved model: set model.name_or_path=RUN/final (or a hub id)"])
    task = tasks.of(cfg)
    if task.reads_loss:  # a reward model (task=reward) has no reference
        check_reference_known(cfg)
    check_output_dir(run_dir)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cpu_only())
    harness.check_launch(cfg.eval.harness, accelerator)
    with rundir.hold(run_dir, accelerator):
        tokenizer = load_tokenizer(cfg.model)
        data = prepare(cfg.data, tokenizer, cfg.train.seed, check=False)
        if not data.eval:
            raise ConfigError(["mode=eval needs held-out data: the data config gives no eval split"])
        loss_fn = task.objective(cfg)
        check_margins(loss_fn, data.eval)
        generation = evalgen.setup(cfg, accelerator, tokenizer, data.eval_pairs, run_dir)  # none for task=reward
        policy, reference, what, choice = _models(cfg, accelerator, tokenizer, data.eval, loss_fn)
        log.info("mode=eval: %s against %s on %d held-out %s", cfg.model.name_or_path, what, len(data.eval), data.unit)
        ref_source = reference if loss_fn.requires_reference else None
        values = evaluate(
            policy, ref_source, loss_fn, data.eval, accelerator, cfg.train.micro_batch_size, tokenizer.pad_token_id,
            choice.layout, choice.head,
        )  # fmt: skip
        with _sinks(cfg, accelerator, run_dir) as metrics:
            if generation is not None:
                evalgen.reference_samples(generation, cfg, accelerator, tokenizer, reference, policy)
                values.update(evalgen.run(generation, policy, tokenizer, cfg.eval, accelerator, 0, metrics))
            held = functools.partial(generating_model, cfg, reference, policy, tokenizer, accelerator.device)
            values.update(
                harness.evaluate(cfg.eval.harness, policy, tokenizer, held, run_dir, accelerator.is_main_process)
            )
            row = {"step": 0, **values}
            metrics.log(row)
        if accelerator.is_main_process:
            record = {"model": cfg.model.name_or_path, "reference": what, "loss": repr(loss_fn),
                      "judge": generation.judge.describe() if generation else None, "metrics": values}  # fmt: skip
            (run_dir / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
            if cfg.logger.report:
                write_reports(run_dir)
            log.info("%s", summary(run_dir, row, None, generation, Path(cfg.model.name_or_path), cfg.logger.report))
    accelerator.wait_for_everyone()  # every process done before any tears the process group down
    accelerator.end_training()
    return row


def _models(
    cfg: Config, accelerator: Any, tokenizer: Any, eval_set: list[Tokenized], loss_fn: Loss | RewardObjective
) -> tuple[Any, Any, str, layout.Choice]:
    """The saved policy and its reference on the device, what the reference is, and the layout
    and LM head (`layout.Choice`) both score the eval set with. A reward model (task=reward): no
    reference, its task's layout."""
    task = tasks.of(cfg)
    policy = load_saved(cfg.model, cfg.model.name_or_path, tokenizer, task).to(accelerator.device).eval()
    if not task.reads_loss:
        return policy, None, f"no reference (task={task.name})", layout.Choice(task.layout, None, task.layout_why)
    reference, what = _reference(cfg, policy, tokenizer)
    if isinstance(reference, ModelReference):
        reference.model.to(accelerator.device)
    choice = layout.choose(
        cfg.train.layout, cfg.train.logits_chunk, policy, False, cfg.model.attn_implementation is None
    )
    micro = cfg.train.micro_batch_size
    choice = layout.probe(choice, policy, eval_set, tokenizer.pad_token_id, loss_fn.needs, micro)
    layout.apply(choice, policy)
    if isinstance(reference, ModelReference):
        layout.check_reference(choice.layout, reference.model)
        layout.apply(choice, reference.model)
        if choice.head is not None:
            from dpo_cli.lmhead import Head

            reference.head = Head.find(reference.model, choice.head.chunk)[0]
    else:
        reference.head = choice.head
    return policy, reference, what, choice


def _sinks(cfg: Config, accelerator: Any, run_dir: Path) -> MetricLogger:
    """metrics.jsonl, W&B, TensorBoard and MLflow on the main process; none elsewhere."""
    sinks: list[Any] = [JsonlSink(run_dir / "metrics.jsonl")] if accelerator.is_main_process else []
    mode = resolve_wandb_mode(cfg.logger.wandb.mode, run_dir) if accelerator.is_main_process else "disabled"
    if sinks and mode != "disabled":
        w = cfg.logger.wandb
        sinks.append(WandbSink(mode, w.project, w.entity, w.name, w.group, w.tags, config.to_container(cfg), run_dir))
    if sinks:
        sinks += tracking.sinks(cfg.logger, config.to_container(cfg), run_dir, resume_step=None)
    return MetricLogger(sinks)
