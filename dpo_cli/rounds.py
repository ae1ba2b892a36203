"""task=iterative: iterative (on-policy) DPO, round after round (Xu et al. 2023; Xiong et al. 2024;
Dong et al. 2024). Each round:

1. sample: `iterative.samples` responses to each of the round's training prompts from the policy
   the round starts from (HF generate with the KV cache, evalgen.generate);
2. judge: score every response with the configured judge (exact, reward model, any `_target_`);
3. pair: best against worst per prompt (or every pair apart by `iterative.min_gap`), ties
   dropped (dpo_cli/pairing.py);
4. train: a task=dpo run on those pairs, in rounds/N/ (dpo_cli/roundconfig.py), whose final/
   the next round starts from;
5. evaluate: the round's policy answers the held-out prompts, judged against the initial
   policy's answers (the run's win rate), when eval.prompts > 0.

Each step's output is saved in rounds/N/ before the next one starts (dpo_cli/roundfiles.py): a
run stopped by a signal or killed resumes (train.resume=auto) at the step it was in, round
training from its last checkpoint, and recomputes nothing it saved. The run's metrics.jsonl,
samples/, report and final/ are the rounds', put together.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import random
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from dpo_cli import evalgen, pairing, publish, roundconfig, rundir, slurm
from dpo_cli import roundfiles as files
from dpo_cli.data import load_pairs
from dpo_cli.errors import ConfigError, Interrupted, UserError
from dpo_cli.evalgen import GenPrompt, eval_prompts
from dpo_cli.losses.options import build_loss
from dpo_cli.metrics import MetricLogger
from dpo_cli.modeling import load_model, load_tokenizer
from dpo_cli.report import write_reports
from dpo_cli.reward import check_margins
from dpo_cli.roundconfig import Initial
from dpo_cli.schema import Config, as_plain
from dpo_cli.signals import StopOnSignal

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Rounds:
    """What every round uses: the run's config and directory, the tokenizer, the judge, the
    shuffled training pairs the prompts are drawn from, the initial policy, and generation
    evaluation against it (None with eval.prompts=0)."""

    cfg: Config
    run_dir: Path
    tokenizer: Any
    judge: Any
    train_pairs: list[dict]
    initial: Initial
    generation: evalgen.GenerationEval | None
    stop: StopOnSignal


def run(cfg: Config, run_dir: Path) -> dict[str, float]:
    """Run the rounds not yet complete in `run_dir` (all, or iterative.rounds_per_job of them);
    return the last round's evaluation."""
    with ExitStack() as held, StopOnSignal() as stop:
        held.enter_context(rundir.hold(run_dir))
        n, ran = 0, 0
        try:
            r = _setup(cfg, run_dir, stop)
            for n in range(1, cfg.iterative.rounds + 1):
                if (files.round_dir(run_dir, n) / files.DONE).is_file():
                    continue
                if cfg.iterative.rounds_per_job and ran == cfg.iterative.rounds_per_job:
                    return _pause(r, n)
                _round(r, n)
                ran += 1
        except Interrupted as e:
            raise _resumable(e, n, run_dir, stop) from None
        (run_dir / files.ROUNDS / files.PENDING).unlink(missing_ok=True)
        return _finish(r)


def _setup(cfg: Config, run_dir: Path, stop: StopOnSignal) -> Rounds:
    """The plan checked against what rounds/ holds, the data, the judge, the initial policy and
    the initial policy's answers to the held-out prompts."""
    from hydra.utils import instantiate

    tokenizer = load_tokenizer(cfg.model)
    pairs = load_pairs(cfg.data, cfg.train.seed)
    check_margins(build_loss(cfg.loss), pairs.train, pairs.eval)  # a column the rounds would not read
    judge = instantiate(cfg.judge)
    problem = judge.check([p["prompt"] for p in pairs.train[:64]]) if hasattr(judge, "check") else None
    if problem:
        raise ConfigError([f"judge: {problem}"])
    _check_plan(cfg, run_dir, judge.describe())
    eval_file = run_dir / files.ROUNDS / files.EVAL_PAIRS
    if not eval_file.is_file():
        files.write_jsonl(eval_file, [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs.eval])
    train_pairs = list(pairs.train)
    random.Random(cfg.train.seed).shuffle(train_pairs)
    log.info("%s", roundconfig.plan(cfg, len(_distinct(train_pairs)), judge.describe()))
    generation = None
    if cfg.eval.prompts:
        prompts = eval_prompts(pairs.eval, tokenizer, cfg.data, cfg.eval.prompts)
        if not prompts:
            raise ConfigError(["judge: the eval split has no prompts to generate responses for"])
        generation = evalgen.GenerationEval(prompts, judge, cfg.eval, run_dir / "samples")
    initial = _initial(cfg, run_dir, tokenizer, stop)
    if hasattr(judge, "load"):
        judge.load(_accelerator(cfg).device)
    if generation is not None:
        _initial_answers(generation, cfg, run_dir, initial, tokenizer)
    _check_stop(stop, "before round 1's samples")
    return Rounds(cfg, run_dir, tokenizer, judge, train_pairs, initial, generation, stop)


def _round(r: Rounds, n: int) -> None:
    """Round `n`, each step skipped when its output is saved (see the module docstring)."""
    d = files.round_dir(r.run_dir, n)
    log.info("round %d of %d", n, r.cfg.iterative.rounds)
    samples = files.read_jsonl(d / files.SAMPLES)
    if samples is None:
        samples = _sample(r, n, _prompts(r, n))
        _check_stop(r.stop, f"after round {n}'s samples")
    else:
        log.info("round %d: the samples saved in %s", n, d / files.SAMPLES)
    scores = files.read_jsonl(d / files.SCORES)
    if scores is None:
        scores = _judge(r, d, samples)
    it = r.cfg.iterative
    found, dropped = pairing.make_pairs([s["scores"] for s in scores], it.pairs, it.min_gap)
    if not (d / files.PAIRS).is_file():
        _pair(d, samples, scores, found)
    stats = _stats(samples, scores, found, dropped)
    if not (d / files.TRAINED).is_file():
        _check_stop(r.stop, f"before round {n}'s training")
        _train(r, n, stats["round/pairs"])
    trained = files.read_json(d / files.TRAINED)
    offset = files.trained_steps(r.run_dir, n)
    evaluation = _evaluate(r, n, offset + trained["steps"])
    files.write_json(d / files.DONE, {"round": n, "steps": trained["steps"], "stats": stats, "eval": evaluation})
    files.compose_metrics(r.run_dir, r.cfg.iterative.rounds)
    log.info("round %d done: %s", n, _line(files.read_json(d / files.DONE)))


def _prompts(r: Rounds, n: int) -> list[GenPrompt]:
    """Round `n`'s prompts: the next iterative.prompts distinct training prompts (all with null),
    in the order of the run's seeded shuffle, starting over when they run out."""
    everything = _distinct(r.train_pairs)
    size = min(r.cfg.iterative.prompts or len(everything), len(everything))
    start = (n - 1) * size % len(everything)
    chosen = (everything * 2)[start : start + size]
    return eval_prompts(chosen, r.tokenizer, r.cfg.data, size)


def _distinct(pairs: list[dict]) -> list[dict]:
    """The first pair of each distinct prompt, in order."""
    distinct: dict[str, dict] = {}
    for pair in pairs:
        distinct.setdefault(json.dumps(pair["prompt"], sort_keys=True), pair)
    return list(distinct.values())


def _sample(r: Rounds, n: int, prompts: list[GenPrompt]) -> list[dict]:
    """k responses to each prompt from the policy round `n` starts from, saved."""
    it, cfg = r.cfg.iterative, r.cfg
    settings = dataclasses.replace(
        cfg.eval, temperature=it.temperature, top_p=it.top_p, max_new_tokens=it.max_new_tokens or cfg.eval.max_new_tokens,
        seed=cfg.train.seed + 1_000_000 * n,
    )  # fmt: skip
    accelerator = _accelerator(cfg)
    section = roundconfig.sampling_section(cfg, r.run_dir, n, r.initial)
    model = load_model(section, r.tokenizer, cfg.train.seed).to(accelerator.device)
    repeated = [p for p in prompts for _ in range(it.samples)]
    out = evalgen.generate(model, repeated, r.tokenizer, settings, accelerator)
    del model
    _free()
    k = it.samples
    samples = [
        {"prompt": p.prompt, "responses": [s.text for s in out[i * k : (i + 1) * k]],
         "tokens": [s.tokens for s in out[i * k : (i + 1) * k]], "finished": [s.finished for s in out[i * k : (i + 1) * k]]}
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    files.write_jsonl(files.round_dir(r.run_dir, n) / files.SAMPLES, samples)
    log.info(
        "round %d: %d responses to %d prompts from %s", n, len(out), len(prompts), section.name_or_path or "the model"
    )
    return samples


def _judge(r: Rounds, d: Path, samples: list[dict]) -> list[dict]:
    """Every response scored (and, for a judge that says why, its verdict), saved."""
    prompts = [s["prompt"] for s in samples for _ in s["responses"]]
    responses = [text for s in samples for text in s["responses"]]
    flat = r.judge.score(prompts, responses)
    why = (
        [r.judge.verdict(p, t) for p, t in zip(prompts, responses, strict=True)]
        if hasattr(r.judge, "verdict")
        else None
    )
    k, rows = r.cfg.iterative.samples, []
    for i in range(len(samples)):
        row: dict[str, Any] = {"scores": flat[i * k : (i + 1) * k]}
        if why is not None:
            row["verdicts"] = why[i * k : (i + 1) * k]
        rows.append(row)
    files.write_jsonl(d / files.SCORES, rows)
    return rows


def _pair(d: Path, samples: list[dict], scores: list[dict], found: list[list[pairing.Pair]]) -> None:
    """The round's preference pairs (its training data), saved as data=pairs reads them."""
    rows = []
    for sample, score, pairs in zip(samples, scores, found, strict=True):
        for c, j in pairs:
            rows.append({"prompt": sample["prompt"], "chosen": _response(sample, c), "rejected": _response(sample, j),
                         "chosen_score": score["scores"][c], "rejected_score": score["scores"][j]})  # fmt: skip
    files.write_jsonl(d / files.PAIRS, rows)


def _response(sample: dict, i: int) -> Any:
    """Response `i` as the pairs format reads it beside the prompt: text after a text prompt, an
    assistant message after a conversation."""
    text = sample["responses"][i]
    return text if isinstance(sample["prompt"], str) else [{"role": "assistant", "content": text}]


def _stats(
    samples: list[dict], scores: list[dict], found: list[list[pairing.Pair]], dropped: Counter
) -> dict[str, float]:
    """The round's `round/` metrics: what its samples scored and what became pairs."""
    flat = [x for s in scores for x in s["scores"]]
    tokens = [t for s in samples for t in s["tokens"]]
    unfinished = [not f for s in samples for f in s["finished"]]
    return {
        "round/prompts": len(samples),
        "round/sample_score": sum(flat) / len(flat),
        "round/best_score": sum(max(s["scores"]) for s in scores) / len(scores),
        "round/pairs": sum(len(p) for p in found),
        "round/ties_dropped": dropped["tie"],
        "round/gap_dropped": dropped["gap"],
        "round/response_length": sum(tokens) / len(tokens),
        "round/unfinished_share": sum(unfinished) / len(unfinished),
    }


def _train(r: Rounds, n: int, pairs: int) -> None:
    """Round `n`'s training run in rounds/N/ (continued from its last checkpoint when it has one);
    a round with fewer pairs than one batch trains nothing and hands its policy on."""
    from dpo_cli import train

    d = files.round_dir(r.run_dir, n)
    cfg = roundconfig.round_config(r.cfg, r.run_dir, n, r.initial)
    steps = roundconfig.steps_of(cfg, pairs)
    if steps == 0:
        log.warning(
            "round %d: %d pairs, fewer than one batch (train.batch_size=%d): it trains no step, and the next "
            "round starts from the policy this one started from",
            n, pairs, cfg.train.batch_size,
        )  # fmt: skip
        _hand_on(r, n, cfg)
    else:
        train.run(cfg, d, r.stop)
        steps = max(row["step"] for row in files.read_jsonl(d / "metrics.jsonl") or [{"step": steps}])
    files.write_json(d / files.TRAINED, {"steps": steps})


def _hand_on(r: Rounds, n: int, cfg: Config) -> None:
    """Round `n`'s final/ as the model it started from (a round that trained no step)."""
    import shutil

    start = Path(cfg.model.name_or_path) if cfg.model.name_or_path else None
    if start is None or not start.is_dir():
        raise UserError(
            f"round {n} has fewer pairs than one batch and starts from {cfg.model.name_or_path!r}, which is no "
            "directory to hand on: lower train.batch_size, or raise iterative.prompts or iterative.samples"
        )
    target = files.round_dir(r.run_dir, n) / "final"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(start, target, ignore=shutil.ignore_patterns("merged", "README.md"))


def _evaluate(r: Rounds, n: int, step: int) -> dict[str, float]:
    """The round's policy on the held-out prompts, judged against the initial policy's answers."""
    if r.generation is None:
        return {}
    accelerator = _accelerator(r.cfg)
    section = roundconfig.sampling_section(r.cfg, r.run_dir, n + 1, r.initial)
    model = load_model(section, r.tokenizer, r.cfg.train.seed).to(accelerator.device)
    values = evalgen.run(r.generation, model, r.tokenizer, r.cfg.eval, accelerator, step, MetricLogger([]))
    del model
    _free()
    return values


def _initial(cfg: Config, run_dir: Path, tokenizer: Any, stop: StopOnSignal) -> Initial:
    """The initial policy: the configured pretrained model as it is, or (a random init, a warm
    start) made once and saved in rounds/0/model/."""
    if cfg.model.random_init is None and not cfg.model.warm_start.steps:
        return Initial(None)
    saved = run_dir / files.ROUNDS / files.INITIAL
    if (saved / "config.json").is_file():
        return Initial(saved)
    from dpo_cli.data.prepare import prepare
    from dpo_cli.warmstart import warm_started

    section = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, r=None))
    model = load_model(section, tokenizer, cfg.train.seed)
    if cfg.model.warm_start.steps:
        train_set = prepare(cfg.data, tokenizer, cfg.train.seed).train
        warm_started(model, train_set, cfg.model.warm_start, cfg.train.seed, tokenizer.pad_token_id,
                     run_dir / "warm_start", progress=cfg.logger.progress,
                     should_stop=lambda: _signal_name(stop))  # fmt: skip
    tmp = saved.with_name(".model.tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(saved)
    del model
    _free()
    log.info("the initial policy, saved in %s", saved)
    return Initial(saved)


def _initial_answers(gen: evalgen.GenerationEval, cfg: Config, run_dir: Path, initial: Initial, tokenizer: Any) -> None:
    """The initial policy's answers to the held-out prompts, made once (samples/reference.jsonl)."""
    what = f"initial policy {initial.saved or cfg.model.name_or_path} (seed {cfg.train.seed})"
    fingerprint = gen.fingerprint(what)
    if gen.load_reference(fingerprint):
        return
    accelerator = _accelerator(cfg)
    section = roundconfig.sampling_section(cfg, run_dir, 1, initial)
    model = load_model(section, tokenizer, cfg.train.seed).to(accelerator.device)
    gen.set_reference(evalgen.generate(model, gen.prompts, tokenizer, cfg.eval, accelerator), fingerprint, True)
    del model
    _free()


def _check_plan(cfg: Config, run_dir: Path, judge: str) -> None:
    """rounds/plan.json: what the saved rounds were made with, written by the first start and
    compared by every resume (iterative.rounds and rounds_per_job may change: a run can be
    extended by more rounds)."""
    it = {k: v for k, v in as_plain(cfg.iterative).items() if k not in ("rounds", "rounds_per_job")}
    plain = as_plain(cfg)
    now = {"iterative": it, "judge": judge, "seed": cfg.train.seed, "model": plain["model"], "data": plain["data"],
           "loss": plain["loss"], "reference": plain["reference"]}  # fmt: skip
    now = json.loads(json.dumps(now))
    path = run_dir / files.ROUNDS / files.PLAN
    changes = files.plan_changes(files.read_json(path), now)
    if changes:
        raise UserError(
            f"{run_dir} holds rounds made with other settings ({'; '.join(changes)}); resume with the settings it "
            "was started with, or start the run in a new hydra.run.dir"
        )
    if not path.is_file():
        files.write_json(path, now)


def _pause(r: Rounds, n: int) -> dict[str, float]:
    """Stop before round `n` (iterative.rounds_per_job reached): rounds/pending says so, for a
    job chain's next job (scripts/slurm/dpo.sbatch submits it)."""
    files.write_text(r.run_dir / files.ROUNDS / files.PENDING, f"{n}\n")
    log.info(
        "stopping before round %d of %d (iterative.rounds_per_job=%d); continue with the same command plus "
        "train.resume=auto hydra.run.dir=%s",
        n, r.cfg.iterative.rounds, r.cfg.iterative.rounds_per_job, r.run_dir,
    )  # fmt: skip
    return {}


def _finish(r: Rounds) -> dict[str, float]:
    """The run's final/ (the last round's), its model card, report and summary."""
    rounds = r.cfg.iterative.rounds
    files.link_final(r.run_dir, rounds)
    (r.run_dir / "final" / "README.md").unlink(missing_ok=True)  # a link to the round's card: the run writes its own
    steps = files.trained_steps(r.run_dir, rounds + 1)
    pairs = sum(files.read_json(files.round_dir(r.run_dir, n) / files.DONE)["stats"]["round/pairs"]
                for n in range(1, rounds + 1))  # fmt: skip
    held_out = len(files.read_jsonl(r.run_dir / files.ROUNDS / files.EVAL_PAIRS) or [])
    publish.finish(r.cfg, r.run_dir, steps, {"train": pairs, "eval": held_out}, "pairs")
    files.compose_metrics(r.run_dir, rounds)
    if r.cfg.logger.report:
        write_reports(r.run_dir)
    last = files.read_json(files.round_dir(r.run_dir, rounds) / files.DONE)
    lines = [f"done: {rounds} rounds, {steps} optimizer steps; run directory {r.run_dir}; final/ is round {rounds}'s"]
    for n in range(1, rounds + 1):
        lines.append(f"  round {n}: {_line(files.read_json(files.round_dir(r.run_dir, n) / files.DONE))}")
    log.info("%s", "\n".join(lines))
    return {**last["stats"], **(last["eval"] or {})}


def _line(done: dict[str, Any]) -> str:
    """A complete round in one line: its samples and pairs, its steps, its evaluation."""
    s, e = done["stats"], done["eval"] or {}
    text = (
        f"{s['round/pairs']} pairs from {s['round/prompts']} prompts (samples' mean score {s['round/sample_score']:.3f}, "
        f"{s['round/ties_dropped']} ties dropped), {done['steps']} steps"
    )
    if e:
        text += (
            f"; held out: judge score {e['eval_judge_score']:.3f} (initial policy {e['eval_reference_judge_score']:.3f}), "
            f"win rate {e['eval_win_rate']:.3f} ({e['eval_win_rate_low']:.3f}-{e['eval_win_rate_high']:.3f})"
        )
    return text


def _accelerator(cfg: Config) -> Any:
    """An Accelerator for sampling and evaluation between the rounds' training runs (each of
    which builds its own)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dpo_cli.distributed import cpu_only

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cpu_only())


def _free() -> None:
    """Return the memory of a model the caller has just dropped (`del model`) before the next loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _signal_name(stop: StopOnSignal) -> str | None:
    import signal

    return signal.Signals(stop.received).name if stop.received else None


def _check_stop(stop: StopOnSignal, where: str) -> None:
    name = _signal_name(stop)
    if name:
        e = Interrupted(f"{name}: stopped {where}", signum=stop.received)
        e.between_rounds = True  # type: ignore[attr-defined]
        raise e


def _resumable(e: Interrupted, n: int, run_dir: Path, stop: StopOnSignal) -> Interrupted:
    """The run's own message for a stop by signal in round `n` (a round's training run names its
    own directory), with the SLURM requeue a warning signal asks for (a round's training run has
    asked for it itself)."""
    where = str(e).split(";")[0]
    if getattr(e, "between_rounds", False) and e.signum is not None:  # (a round's training run hands on itself)
        slurm.hand_on(e.signum, stop.previous(e.signum))
    return Interrupted(
        f"{where}{'' if 'round' in where else f' in round {n}'}; the rounds' saved samples, scores, pairs and checkpoints are kept. Continue with the same "
        f"command plus train.resume=auto hydra.run.dir={run_dir}",
        signum=e.signum,
    )
