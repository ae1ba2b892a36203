"""A task=iterative run's rounds as configs: each round's training run (a task=dpo run on the
round's pairs, in rounds/N/), and the plan mode=inspect and the log print.

Round N's training run is the run's own config with
- model: the policy round N starts from: the initial policy for round 1, round N-1's final/
  (final/merged/ under LoRA: each round puts a fresh adapter on the merged model) after;
- reference: round 1's as configured; later rounds, with iterative.reference=previous, the policy
  the round starts from (the reference of Xu et al. 2023 and Yuan et al. 2024), with initial, round
  1's reference (Xiong et al. 2024's KL to the initial policy);
- data: data=pairs on rounds/N/pairs.jsonl, evaluated on rounds/eval.jsonl (the run's held-out
  pairs), with the run's lengths and chat template;
- no judge (the rounds are judged against the initial policy by the run itself), no report and
  no push (the run's own, at its end), train.resume=auto once it has started (a resumed round
  continues), its
  own seed (train.seed + N - 1), and W&B runs named <run>-round-N in group <run>.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpo_cli import recorded
from dpo_cli.roundfiles import EVAL_PAIRS, PAIRS, ROUNDS, final_model, round_dir, write_text
from dpo_cli.schema import Config, as_plain


@dataclasses.dataclass(frozen=True)
class Initial:
    """Where the initial policy is: a directory this run saved (rounds/0/model: a random init or
    a warm start made in memory), or None for the configured model itself (its pretrained
    weights as they are)."""

    saved: Path | None


def _load(model: dict[str, Any], path: Path | str) -> None:
    """Model section `model` (plain) loading the full model directory `path`."""
    model.update(name_or_path=str(path), revision=None, gguf_file=None, random_init=None, tokenizer=None)
    model["warm_start"]["steps"] = 0


def sampling_section(cfg: Config, run_dir: Path, n: int, initial: Initial) -> Any:
    """The model section that loads the policy round `n` starts from (no LoRA, no checkpointing)."""
    c = round_config(cfg, run_dir, n, initial, write=False)
    return dataclasses.replace(c.model, lora=dataclasses.replace(c.model.lora, r=None), gradient_checkpointing=False)


def round_config(cfg: Config, run_dir: Path, n: int, initial: Initial, write: bool = True) -> Config:
    """Round `n`'s training run's config (see the module docstring), typed as a run's recorded
    config is read back; with `write`, also saved as rounds/N/.hydra/config.yaml, where
    `mode=eval model.name_or_path=rounds/N/final` finds it."""
    plain = as_plain(cfg)
    plain["task"], plain["judge"] = "dpo", None
    model, reference, it = plain["model"], plain["reference"], cfg.iterative
    if n > 1:
        _load(model, final_model(run_dir, n - 1))
    elif initial.saved is not None:
        _load(model, initial.saved)
    else:
        model["warm_start"]["steps"] = 0
    if n > 1 and it.reference == "previous":
        reference.update(name_or_path=None, revision=None, gguf_file=None)
    elif n > 1 and cfg.reference.name_or_path is None:  # initial: the policy round 1 started from
        if initial.saved is not None:
            reference.update(name_or_path=str(initial.saved), revision=None, gguf_file=None)
        else:
            m = cfg.model
            reference.update(name_or_path=m.name_or_path, revision=m.revision, gguf_file=m.gguf_file)
    data = cfg.data
    plain["data"] = {
        "format": "pairs",
        "path": str(round_dir(run_dir, n) / PAIRS),
        "eval_path": str(run_dir / ROUNDS / EVAL_PAIRS),
        "max_length": data.max_length,
        "max_prompt_length": data.max_prompt_length,
        "truncation_mode": data.truncation_mode,
        "chat_template": data.chat_template,
        "cache_dir": None,
        "max_train_pairs": None,
        "max_eval_pairs": None,
    }
    d = round_dir(run_dir, n)
    started = (d / "checkpoints").is_dir() or (d / "metrics.jsonl").is_file()  # continued (or set aside) as any run
    plain["train"].update(resume="auto" if started else None, seed=cfg.train.seed + n - 1)
    plain["export"].update(push_to_hub=None, merge_lora=cfg.model.lora.r is not None or cfg.export.merge_lora)
    plain["eval"]["generate_every"] = None
    plain["eval"]["harness"]["at_end"] = cfg.eval.harness.at_end and n == it.rounds
    wandb = plain["logger"]["wandb"]
    name = cfg.logger.wandb.name or run_dir.name
    wandb.update(name=f"{name}-round-{n}", group=cfg.logger.wandb.group or name)
    plain["logger"]["report"] = False
    if write:
        path = round_dir(run_dir, n) / ".hydra" / "config.yaml"
        write_text(path, OmegaConf.to_yaml(OmegaConf.create(plain)))
    return recorded.typed_record(plain, f"round {n}'s config")


def steps_of(cfg: Config, pairs: int) -> int:
    """Optimizer steps a round with `pairs` training pairs trains (0 below one batch)."""
    per_epoch = pairs // cfg.train.batch_size
    return 0 if per_epoch == 0 else cfg.train.max_steps or cfg.train.epochs * per_epoch


def plan(cfg: Config, train_prompts: int, judge: str) -> str:
    """The rounds and what they cost, in words (mode=inspect, and the log at the start)."""
    it, t = cfg.iterative, cfg.train
    prompts = min(it.prompts or train_prompts, train_prompts)
    responses = prompts * it.samples
    new_tokens = it.max_new_tokens or cfg.eval.max_new_tokens
    most_pairs = prompts * (1 if it.pairs == "best_worst" else it.samples * (it.samples - 1) // 2)
    steps = f"{t.max_steps} optimizer steps" if t.max_steps else f"{t.epochs} epoch(s) over its pairs"
    start = "the previous round's policy" if it.reference == "previous" else "round 1's reference"
    evaluation = (
        f"then {cfg.eval.prompts} held-out prompts are answered and judged against the initial policy's answers"
        if cfg.eval.prompts
        else "no evaluation against the initial policy (eval.prompts=0)"
    )
    total = f"{it.rounds * t.max_steps} optimizer steps" if t.max_steps else "steps as the pairs allow"
    return "\n".join(
        [
            f"rounds: {it.rounds} (task=iterative; {it.rounds_per_job or it.rounds} per job)",
            f"  each round: {it.samples} responses to each of {prompts} training prompts ({responses} responses, at "
            f"most {responses * new_tokens} new tokens, temperature {it.temperature}), scored by {judge}",
            f"  pairs: {it.pairs}, min_gap {it.min_gap}: at most {most_pairs} per round (ties dropped)",
            f"  training: {steps} of batch {t.batch_size} from the policy the round starts from, against {start}; "
            + evaluation,
            f"  in all: {it.rounds * responses} sampled responses (at most {it.rounds * responses * new_tokens} "
            f"tokens), {it.rounds * responses} judge calls, {total}",
        ]
    )
