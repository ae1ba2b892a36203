"""Generation evaluation: sample responses to held-out prompts from the policy and from the
reference, judge each pair, and report the policy's win rate with a confidence interval.

The prompts are the first `eval.prompts` distinct prompts of the eval split, rendered and
truncated as in training. Decoding (`eval.*`: max new tokens, temperature, top-p, seed) runs in
batches with the model's KV cache; batch k goes to process k mod P and is sampled from a seed
of its own (eval.seed + k), so the samples do not depend on the number of processes. The
training RNG is left as it was. The reference's samples and scores are made once per run
(`samples/reference.jsonl`, reused on resume) and compared with the policy's at every
evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpo_cli.attention import generation_attention, use_attention
from dpo_cli.compiling import eager
from dpo_cli.data.chat import is_conversational, load_template, render
from dpo_cli.data.tokenize import tokenize_pairs, truncate
from dpo_cli.judges import Prompt
from dpo_cli.schema import Config, DataConfig, EvalConfig

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.jsonl"


@dataclass
class GenPrompt:
    prompt: Prompt  # as the data holds it (a string or messages): what judges read
    ids: list[int]  # the token ids the model continues (chat template applied, cut like training)


@dataclass
class Sample:
    text: str  # the response, special tokens left out
    tokens: int  # tokens generated, the end-of-sequence token included
    finished: bool  # it ended (EOS) within eval.max_new_tokens


def eval_prompts(pairs: list[dict], tokenizer: Any, data: DataConfig, n: int) -> list[GenPrompt]:
    """The first `n` distinct prompts of `pairs` (normalized eval pairs or unpaired examples),
    as token ids exactly as training renders and tokenizes them; a prompt longer than
    data.max_prompt_length is cut as training cuts a long pair's prompt."""
    template = load_template(data.chat_template) if data.chat_template else None
    out: list[GenPrompt] = []
    seen: set[str] = set()
    for pair in pairs:
        if len(out) == n:
            break
        key = json.dumps(pair["prompt"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        # A stand-in response of the pair's kind, so that rendering and tokenizing run as in training.
        stub: Any = [{"role": "assistant", "content": "x"}] if is_conversational(pair) else " x"
        rendered, _ = render([{"prompt": pair["prompt"], "chosen": stub, "rejected": stub}], tokenizer, template)
        if not rendered:
            continue
        rendered[0]["rejected"] = rendered[0]["chosen"] + "y"  # tokenize_pairs drops identical responses
        tokenized, _ = tokenize_pairs(rendered, tokenizer, 10**9, 10**9)
        if not tokenized:
            continue
        ids = tokenized[0]["prompt_ids"]
        long = [tokenizer.eos_token_id] * data.max_length  # a response that forces the prompt rule
        cut = truncate(ids, long, long, data.max_length, data.max_prompt_length, data.truncation_mode == "keep_end",
                       tokenizer.bos_token_id)  # fmt: skip
        out.append(GenPrompt(pair["prompt"], cut["prompt_ids"]))
    return out


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(
    model: Any, prompts: list[GenPrompt], tokenizer: Any, settings: EvalConfig, accelerator: Any
) -> list[Sample]:
    """One sample per prompt from `model` (unwrapped), decoded with `settings` (the config's
    `eval` section), batches spread over processes; every process gets every sample, in order."""
    from accelerate.utils import gather_object
    from transformers import GenerationConfig

    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    greedy = settings.temperature == 0
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else settings.temperature,
        top_p=None if greedy else settings.top_p,
        top_k=None,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    attention = generation_attention(model)
    size = settings.batch_size
    batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    mine: list[tuple[int, list[Sample]]] = []
    device = accelerator.device
    devices = [device] if device.type == "cuda" else []
    for k in range(accelerator.process_index, len(batches), accelerator.num_processes):
        batch = batches[k]
        width = max(len(p.ids) for p in batch)
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch], device=device)
        with torch.random.fork_rng(devices=devices), accelerator.autocast(), use_attention(model, attention), eager():
            torch.manual_seed(settings.seed + k)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        samples = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in eos), None)
            kept = row if end is None else row[:end]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            samples.append(Sample(text, len(row) if end is None else end + 1, end is not None))
        mine.append((k, samples))
    model.train(was_training)
    gathered = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    ordered = sorted((k, s) for part in gathered for k, s in part)
    return [s for _, samples in ordered for s in samples]


def win_rate(policy: list[float], reference: list[float], confidence: float) -> dict[str, float]:
    """The share of prompts where the policy's score beats the reference's, ties counting half,
    with a Wilson score interval at `confidence` (over n prompts; a tie counts as half a win,
    which makes the interval slightly wider than the ties' lower variance needs)."""
    n = len(policy)
    wins = sum(p > r for p, r in zip(policy, reference, strict=True))
    ties = sum(p == r for p, r in zip(policy, reference, strict=True))
    rate = (wins + ties / 2) / n
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return {"win_rate": rate, "win_rate_low": max(0.0, centre - half), "win_rate_high": min(1.0, centre + half),
            "tie_rate": ties / n}  # fmt: skip


def outcome(policy: float, reference: float) -> str:
    return "win" if policy > reference else "tie" if policy == reference else "loss"


def _verdicts(judge: Any, prompts: list[GenPrompt], samples: list[Sample]) -> list[str | None]:
    """Why each response scored as it did, for judges that say (the exact judge)."""
    if not hasattr(judge, "verdict"):
        return [None] * len(samples)
    return [judge.verdict(p.prompt, s.text) for p, s in zip(prompts, samples, strict=True)]


class GenerationEval:
    """Held-out prompts, a judge, the decoding settings, and the reference's samples once made."""

    def __init__(self, prompts: list[GenPrompt], judge: Any, settings: EvalConfig, samples_dir: Path):
        self.prompts, self.judge, self.settings, self.dir = prompts, judge, settings, samples_dir
        self.reference: list[Sample] = []
        self.reference_scores: list[float] = []

    def fingerprint(self, reference_what: str) -> str:
        """What the reference's samples depend on: the prompts' ids, the decoding settings and
        the reference model's description."""
        s = self.settings
        key = [[p.ids for p in self.prompts], s.max_new_tokens, s.temperature, s.top_p, s.seed, s.batch_size,
               reference_what, self.judge.describe()]  # fmt: skip
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def load_reference(self, fingerprint: str) -> bool:
        """Take the reference's samples and scores from samples/reference.jsonl when it was made
        for the same prompts, settings, reference and judge."""
        path = self.dir / REFERENCE_FILE
        if not path.is_file():
            return False
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(rows) != len(self.prompts) or any(r.get("fingerprint") != fingerprint for r in rows):
            return False
        self.reference = [Sample(r["response"], r["tokens"], r["finished"]) for r in rows]
        self.reference_scores = [r["score"] for r in rows]
        return True

    def set_reference(self, samples: list[Sample], fingerprint: str, main_process: bool) -> None:
        """The reference's samples, scored once; written to samples/reference.jsonl."""
        self.reference = samples
        self.reference_scores = self.judge.score([p.prompt for p in self.prompts], [s.text for s in samples])
        if main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            lines = [
                json.dumps(
                    {
                        "fingerprint": fingerprint,
                        "prompt": p.prompt,
                        "response": s.text,
                        "tokens": s.tokens,
                        "finished": s.finished,
                        "score": score,
                    }
                )  # fmt: skip
                for p, s, score in zip(self.prompts, samples, self.reference_scores, strict=True)
            ]
            (self.dir / REFERENCE_FILE).write_text("".join(line + "\n" for line in lines))

    def evaluate(self, samples: list[Sample]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The `eval_`-prefixed generation metrics of the policy's `samples` against the
        reference's, and one row per prompt for samples/step-N.jsonl."""
        prompts = [p.prompt for p in self.prompts]
        scores = self.judge.score(prompts, [s.text for s in samples])
        rate = win_rate(scores, self.reference_scores, self.settings.confidence)
        mean = statistics.fmean
        metrics = {
            **{f"eval_{k}": v for k, v in rate.items()},
            "eval_judge_score": mean(scores),
            "eval_reference_judge_score": mean(self.reference_scores),
            "eval_response_length": mean(s.tokens for s in samples),
            "eval_reference_response_length": mean(s.tokens for s in self.reference),
            "eval_unfinished_share": mean(not s.finished for s in samples),
        }
        verdicts = _verdicts(self.judge, self.prompts, samples)
        ref_verdicts = _verdicts(self.judge, self.prompts, self.reference)
        rows = []
        for i, p in enumerate(self.prompts):
            s, r = samples[i], self.reference[i]
            row = {"prompt": p.prompt, "policy": s.text, "reference": r.text, "policy_score": scores[i],
                   "reference_score": self.reference_scores[i], "outcome": outcome(scores[i], self.reference_scores[i]),
                   "policy_tokens": s.tokens, "reference_tokens": r.tokens, "policy_finished": s.finished,
                   "reference_finished": r.finished}  # fmt: skip
            if verdicts[i] is not None:
                row.update(policy_verdict=verdicts[i], reference_verdict=ref_verdicts[i])
            rows.append(row)
        return metrics, rows


def write_samples(samples_dir: Path, step: int, rows: list[dict[str, Any]]) -> Path:
    samples_dir.mkdir(parents=True, exist_ok=True)
    path = samples_dir / f"step-{step}.jsonl"
    path.write_text("".join(json.dumps({"step": step, **row}) + "\n" for row in rows))
    return path


def setup(
    cfg: Config, accelerator: Any, tokenizer: Any, eval_pairs: list[dict], run_dir: Path
) -> GenerationEval | None:
    """Generation evaluation for a run, before any weights load (None without a judge or with
    eval.prompts=0): the judge, checked against the prompts, and loaded on the main process
    (only it scores), so that a reward model that cannot be had fails first."""
    from hydra.utils import instantiate

    from dpo_cli.distributed import sharded
    from dpo_cli.errors import ConfigError, UserError

    if cfg.judge is None or cfg.eval.prompts == 0:
        return None
    if sharded(accelerator):
        raise UserError(
            f"generation evaluation does not run under {accelerator.distributed_type.value} yet (sharded weights "
            "make every forward a collective); set judge=none, and evaluate final/ with mode=eval on a DDP or "
            "single-process launch"
        )
    judge = instantiate(cfg.judge)
    prompts = eval_prompts(eval_pairs, tokenizer, cfg.data, cfg.eval.prompts)
    if not prompts:
        raise ConfigError(["judge: the eval split has no prompts to generate responses for"])
    problem = judge.check([p.prompt for p in prompts]) if hasattr(judge, "check") else None
    if problem:
        raise ConfigError([f"judge: {problem}"])
    if accelerator.is_main_process and hasattr(judge, "load"):
        judge.load(accelerator.device)
    return GenerationEval(prompts, judge, cfg.eval, run_dir / "samples")


def reference_samples(
    gen: GenerationEval, cfg: Config, accelerator: Any, tokenizer: Any, reference: Any, policy: Any
) -> None:
    """The reference's samples, from samples/reference.jsonl when it was made for the same
    prompts, settings, reference and judge, else generated now (before any update: the initial
    policy may be the reference) and scored once."""
    from accelerate.utils import broadcast_object_list

    from dpo_cli.reference import generating_model

    what = cfg.reference.name_or_path or f"initial policy (seed {cfg.train.seed})"
    fingerprint = gen.fingerprint(str(what))
    found = [gen.load_reference(fingerprint) if accelerator.is_main_process else False]
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    if found[0]:
        log.info("generation evaluation: the reference's samples from %s", gen.dir / REFERENCE_FILE)
    else:
        with generating_model(cfg, reference, policy, tokenizer, accelerator.device) as model:
            samples = generate(model, gen.prompts, tokenizer, cfg.eval, accelerator)
        if accelerator.is_main_process:
            gen.set_reference(samples, fingerprint, main_process=True)
    if accelerator.is_main_process:
        log.info(
            "generation evaluation: %d held-out prompts, judge %s; the reference's responses: %.1f tokens, "
            "score %.3f (means)",
            len(gen.prompts), gen.judge.describe(), statistics.fmean(s.tokens for s in gen.reference),
            statistics.fmean(gen.reference_scores),
        )  # fmt: skip


def run(
    gen: GenerationEval, model: Any, tokenizer: Any, settings: EvalConfig, accelerator: Any, step: int, sink: Any
) -> dict:
    """Sample from `model` (every process takes part), judge against the reference on the main
    process, write samples/step-N.jsonl and the W&B table; the metrics (main process only)."""
    samples = generate(model, gen.prompts, tokenizer, settings, accelerator)
    if not accelerator.is_main_process:
        return {}
    metrics, rows = gen.evaluate(samples)
    write_samples(gen.dir, step, rows)
    sink.table("eval_samples", rows, step)
    return metrics
