#!/usr/bin/env python
"""Training throughput of dpo-cli next to TRL's DPOTrainer: pairs/s, tokens/s, peak memory, MFU.

    python scripts/bench.py                                   # SmolLM2-135M, HH-style pairs, batch 4, 512 tokens
    python scripts/bench.py --batch 2 --seq 128 --steps 1,2   # a quick look
    python scripts/bench.py --lengths fixed                   # every sequence exactly --seq tokens, no padding
    python scripts/bench.py --variant auto: --variant padded:train.layout=padded    # one dpo-cli row each
    python scripts/bench.py --no-trl --variant live: --variant lora:model.lora.r=16   # dpo-cli rows only
    python scripts/bench.py --trl-arg gradient_checkpointing=false                    # a non-default TRL setting
    python scripts/bench.py --models tiny --no-trl            # the built-in tiny model on its synthetic task
    python scripts/bench.py --models qwen05 --device cuda --dtype bf16 --json bench.json   # a GPU, 1024 and 2048
    python scripts/bench.py --models qwen05 --device cpu --dry-run --json bench.json       # the same path, tiny

Every run is a fresh child process, so its peak RSS (and peak CUDA memory) is its own. dpo-cli's
children compose the config with Hydra's compose API exactly as `dpo-train` does and call
`dpo_cli.train.run(cfg)`; TRL's (scripts/bench_trl.py) build `trl.DPOTrainer` with DPOConfig's
defaults (on TRL 1.16: gradient checkpointing, its fused LM head, a live reference copy) except
what must match: the model directory, the pairs, batch size, max length, precision, device,
learning rate and beta. dpo-cli runs with its own defaults likewise.

Device and precision: --device auto takes CUDA when torch sees a GPU; --device cpu hides any GPU
from the children. --dtype auto is bf16 on CUDA, fp32 on the CPU. bf16 is the same in both tools:
float32 weights with bf16 autocast (dpo-cli: train.mixed_precision=bf16 with model.dtype float32;
TRL: bf16=True, its default, loading the model in float32, its default). On CUDA TRL's use_cpu
stays at its default (False), so it takes the GPU as dpo-cli does.

Models: smollm2 (a local copy: `make smollm2`), tiny (built in code; dpo-cli only), and qwen05:
Qwen2.5-0.5B's config with random weights (seeded), written at run time into the temporary
directory with SmolLM2's tokenizer (scripts/gpu/tokenizer, 49152 tokens; the model keeps Qwen's
151936-token vocabulary, so the head costs what it does in the real model). Both tools load that
directory. qwen05 defaults: fixed lengths (every sequence exactly --seq tokens: the tokens per
step are known, 2 x seq per pair), --seq 1024,2048 (one measurement each), batch 8 pairs (one
dpo-cli micro batch, its default size; sized for an 80 GB H100), runs of 3 and 8 steps.
--dry-run shrinks qwen05 to 2 narrow layers and the tokenizer's vocabulary, batch 2, length 64,
runs of 2 and 10 steps: the whole path, TRL included, in well under a minute on 2 CPU cores.

Each tool runs twice, for A and B optimizer steps (--steps A,B), on A x batch and B x batch pairs
(the first of which are the same): one epoch each, so both tools train on exactly the same pairs and
the extra B - A steps cover the same (B - A) x batch pairs. Per-step time = (time_B - time_A) / (B -
A), which cancels start-up (model loading, tokenizing, saving) and the first steps' warm-up (A >= 2
in the defaults); on CUDA each child calls torch.cuda.synchronize() before it reads its clock. When
other work on the machine makes the B-step run no longer than the A-step one, the median of the
B-step run's own logged step times (after its first) is used, and the row's `timed_by` says so.
Prints figures only; asserts nothing: the targets (TARGETS) are printed, met or not.
Achieved FLOP/s credits each pair with the tokens a padded trainer computes (the prompt once per
response); a dpo-cli layout that computes a shared prompt once does less work than it is credited.
MFU = 8N x tokens/s over the peak: on CUDA the card's dense bf16 peak, looked up from its name
(GPU_PEAKS; an unknown card gets no MFU); on the CPU the measured float32 matmul peak.
On a busy machine, --threads 1 and --repeat 2 steady the figures.

--json PATH writes one object: device, dtype, name (the card or CPU), peak_tflops, peak_source,
versions, dry_run, rows (per tool per model per length: pairs_per_s, tokens_per_s,
tokens_per_s_per_gpu, mfu, step_seconds, peak_rss_bytes, peak_cuda_allocated_bytes,
peak_cuda_reserved_bytes, plan and settings as run, or error), targets (each with met), targets_met
and ok. Exit code: 0 when every run finished, 1 with a one-line reason when a child failed, 2 when
--device cuda finds no GPU. TRL: pip install -e ".[parity]".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = ROOT / "models" / "smollm2-135m-instruct"
TRL_WORKER = Path(__file__).resolve().parent / "bench_trl.py"
ASSISTANT = "\n\nAssistant:"  # where dpo-cli's hh loader splits a dialogue (dpo_cli/data/formats/hh.py)

# Per-model defaults. `hf_dir`: a Hugging Face directory TRL can load (the tiny model is built in code;
# qwen05's is written at run time, see `qwen05_dir`). `seq`: the lengths measured, one row each.
MODELS = {
    "smollm2": {
        "overrides": ["model=smollm2", f"model.name_or_path={SMOLLM2_DIR}"],
        "hf_dir": SMOLLM2_DIR,
        "data": "hh",
        "lengths": "hh",
        "batch": 4,
        "seq": (512,),
        "steps": (2, 6),
    },
    "tiny": {
        "overrides": ["model=tiny"],
        "hf_dir": None,
        "data": "synthetic",
        "lengths": "hh",
        "batch": 64,
        "seq": None,
        "steps": (5, 25),
    },
    # Qwen2.5-0.5B's shape with random weights and SmolLM2's tokenizer, for GPUs. Fixed lengths, so that
    # every sequence is exactly `seq` tokens and a step's tokens are known (8 x 2 x seq). Batch 8 pairs
    # (dpo-cli's default micro batch, one forward per step) fits an 80 GB H100 at 2048 tokens.
    "qwen05": {
        "overrides": ["model=pretrained"],  # + model.name_or_path=<the directory written at run time>
        "hf_dir": None,
        "data": "hh",
        "lengths": "fixed",
        "batch": 8,
        "seq": (1024, 2048),
        "steps": (3, 8),
    },
}
# --dry-run: the fewest steps and pairs that still time two run lengths (A >= 2 leaves warm-up out)
DRY_RUN = {"batch": 2, "seq": (64,), "steps": (2, 10)}
# dpo-cli vs TRL, printed next to the figures (never asserted). On the CPU: >= 3x the pairs/s at <= 0.5x
# the peak RSS. On CUDA: >= 2x the tokens/s at <= 0.6x the peak CUDA memory allocated, and >= 30% MFU
# (8N, against the card's dense bf16 peak) for dpo-cli on qwen05 at 2048 tokens.
TARGETS = {
    "cpu": {"speedup": 3.0, "speed_of": "pairs/s", "memory": 0.5, "memory_of": "peak_rss"},
    "cuda": {"speedup": 2.0, "speed_of": "tokens/s", "memory": 0.6, "memory_of": "peak_cuda", "mfu": 0.30},
}
MFU_TARGET_AT = ("qwen05", 2048)  # (model, length) where the MFU target applies


# --------------------------------------------------------------------------------------------
# data: HH-format dialogues from a seeded RNG

WORDS = (
    "the a an and or but so because if when while after before then also very quite really just "
    "model learns pairs answers one is preferred other not policy moves toward better responses staying close reference "
    "we you they it this that these those there here what which who how why where "
    "people often ask about cooking travel science history music code health money weather garden bread coffee "
    "recipe oven flour water salt train ticket city museum river mountain planet energy light sound python function "
    "error file list loop number budget rent savings loan doctor sleep exercise rain wind summer winter "
    "good clear short polite correct helpful bad vague wrong rude simple careful quick slow warm cold new old "
    "make take give find keep try use need want know think say tell help start stop change learn explain check "
    "time day week year hour minute step part way idea problem question answer reason example detail result"
).split()

# Words per turn ~ lognormal(median, sigma), clamped: with SmolLM2's tokenizer a whole dialogue is
# then 100-450 tokens (10th-90th percentile, median ~250) with ~6% of sequences past 512, and a
# response a few dozen to a few hundred tokens.
HUMAN_WORDS = (20, 0.6, 4, 200)
ASSISTANT_WORDS = (45, 0.7, 5, 400)
RESPONSE_WORDS = (70, 0.8, 8, 600)


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words)), str(rng.randint(2, 2030)))
    if rng.random() < 0.3:
        words[rng.randrange(1, len(words))] += ","
    return " ".join(words).capitalize() + "."


def _text(rng: random.Random, n_words: int, question: bool = False) -> str:
    """Sentences of exactly `n_words` words in all (the last one cut short), the last a question if
    `question`."""
    words: list[str] = []
    while len(words) < n_words:
        words += _sentence(rng).split()
    words = words[:n_words]
    return " ".join(words).rstrip(",.") + ("?" if question else ".")


def _draw(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))


def _hh_triple(rng: random.Random, seq: int) -> tuple[str, str, str]:
    """1-3 exchanges, then the final human turn and two responses of independent lengths. Earlier
    exchanges are dropped (and the last human turn shortened) to keep the prompt under ~0.75 x seq
    words, so that no prompt alone fills `seq` tokens (TRL would drop such pairs, dpo-cli cuts them)."""
    cap = int(0.75 * seq)
    exchanges = [(_draw(rng, *HUMAN_WORDS), _draw(rng, *ASSISTANT_WORDS)) for _ in range(rng.randint(1, 3) - 1)]
    last = _draw(rng, *HUMAN_WORDS)
    while exchanges and sum(h + a for h, a in exchanges) + last > cap:
        exchanges.pop(0)
    prompt = "".join(f"\n\nHuman: {_text(rng, h, True)}\n\nAssistant: {_text(rng, a)}" for h, a in exchanges)
    prompt += f"\n\nHuman: {_text(rng, min(last, cap), True)}{ASSISTANT}"
    return prompt, " " + _text(rng, _draw(rng, *RESPONSE_WORDS)), " " + _text(rng, _draw(rng, *RESPONSE_WORDS))


def _fixed_triple(rng: random.Random, seq: int) -> tuple[str, str, str]:
    """A prompt of 0.55 x seq words (more than seq / 2 tokens under any tokenizer with at least one
    token per word, fewer than seq with SmolLM2's ~1.2) and responses of seq words: dpo-cli cuts the
    prompt to seq / 2 and the responses to the rest, TRL keeps the prompt and cuts the responses, so
    every sequence is exactly `seq` tokens in both (no padding)."""
    n = int(0.55 * seq)
    prompt = f"\n\nHuman: {_text(rng, n // 3, True)}\n\nAssistant: {_text(rng, n // 3)}"
    prompt += f"\n\nHuman: {_text(rng, n - 2 * (n // 3), True)}{ASSISTANT}"
    return prompt, " " + _text(rng, seq), " " + _text(rng, seq)


def make_pairs(n: int, lengths: str, seq: int, seed: int) -> list[tuple[str, str, str]]:
    """`n` (prompt, chosen, rejected) triples; the first k are the same for any n >= k."""
    rng = random.Random(seed)
    triple = _hh_triple if lengths == "hh" else _fixed_triple
    return [triple(rng, seq) for _ in range(n)]


def write_hh(path: Path, triples: list[tuple[str, str, str]]) -> None:
    """HH-RLHF rows: {"chosen": whole dialogue, "rejected": whole dialogue}."""
    with path.open("w") as f:
        for prompt, chosen, rejected in triples:
            f.write(json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected}) + "\n")


def split_hh(chosen: str, rejected: str) -> dict[str, str]:
    """dpo-cli's hh split (dpo_cli/data/formats/hh.py): the prompt is the dialogue up to and including the
    last "\\n\\nAssistant:", the responses are what follows (the rows written here always share it)."""
    cut = chosen.rfind(ASSISTANT) + len(ASSISTANT)
    assert cut >= len(ASSISTANT) and rejected[:cut] == chosen[:cut], "an HH row without a shared prompt"
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


# --------------------------------------------------------------------------------------------
# token lengths as each tool sees them


def _cut_dpo_cli(p: int, c: int, r: int, max_length: int, max_prompt: int) -> tuple[int, int, int]:
    """dpo-cli's rule (dpo_cli/data/tokenize.py, `truncate`): when prompt + longer response exceeds
    max_length, a prompt over max_prompt_length keeps its last max_prompt_length tokens; then both
    responses are cut to the room left."""
    if p + max(c, r) > max_length and p > max_prompt:
        p = max_prompt
    room = max(max_length - p, 0)
    return p, min(c, room), min(r, room)


def _cut_trl(p: int, c: int, r: int, max_length: int) -> tuple[int, int, int]:
    """TRL 1.16's rule (DataCollatorForPreference, truncation_mode="keep_start"): each whole sequence
    prompt + response keeps its first max_length tokens; there is no prompt limit."""
    return min(p, max_length), max(0, min(p + c, max_length) - p), max(0, min(p + r, max_length) - p)


def token_lengths(hf_dir: Path, triples: list[tuple[str, str, str]]) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts before truncation, as both tools tokenize: the
    prompt alone, each response as what follows the prompt's ids in prompt + response, plus EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    out = []
    for prompt, chosen, rejected in triples:
        p = len(tok(prompt)["input_ids"])
        c = len(tok(prompt + chosen)["input_ids"]) - p + 1
        r = len(tok(prompt + rejected)["input_ids"]) - p + 1
        out.append((p, c, r))
    return out


def _stat(values: list[int]) -> str:
    return f"{statistics.mean(values):6.1f} {statistics.median(values):6.0f} {max(values):5d}"


def length_report(raw: list[tuple[int, int, int]], seq: int, max_prompt: int) -> tuple[str, dict[str, float]]:
    """A table of mean/median/max prompt, chosen and rejected tokens as read and after each tool's
    truncation, and the non-padding tokens per pair (prompt + chosen + prompt + rejected) each tool
    should train on."""
    views = {
        "as written": raw,
        "dpo-cli": [_cut_dpo_cli(p, c, r, seq, max_prompt) for p, c, r in raw],
        "TRL": [_cut_trl(p, c, r, seq) for p, c, r in raw],
    }
    lines = [f"{'':12}{'prompt mean/median/max':>24}{'chosen':>22}{'rejected':>22}{'tokens/pair':>14}"]
    per_pair = {}
    for name, rows in views.items():
        cols = [_stat([row[i] for row in rows]) for i in range(3)]
        per_pair[name] = statistics.mean(2 * p + c + r for p, c, r in rows)
        lines.append(f"{name:12}{cols[0]:>24}{cols[1]:>22}{cols[2]:>22}{per_pair[name]:14.1f}")
    long_pairs = sum(p + max(c, r) > seq for p, c, r in raw)
    cut_prompts = sum(p > max_prompt and p + max(c, r) > seq for p, c, r in raw)
    trl_dropped = sum(p >= seq for p, _, _ in raw)
    lines.append(
        f"{len(raw)} pairs; {long_pairs} longer than {seq} tokens (prompt + longer response): dpo-cli cuts "
        f"{cut_prompts} prompts to their last {max_prompt} tokens, then responses to fit; TRL keeps whole prompts and "
        f"cuts each sequence at {seq}"
        + (f"; TRL drops {trl_dropped} pairs whose prompt fills {seq}" if trl_dropped else "")
    )
    return "\n".join(lines), per_pair


# --------------------------------------------------------------------------------------------
# shared by the workers (bench_trl.py imports these)


def linear_params(model) -> int:
    """Parameters of the nn.Linear layers, lm_head included even when tied to the embeddings (its
    matmul runs either way), the embedding lookup excluded: the N of the 6N/8N FLOP estimate."""
    import torch

    return sum(
        m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )


def linear_params_of_dir(config_dir: Path) -> int | None:
    """linear_params of a Hugging Face model directory, built on the meta device (no weights)."""
    if not (Path(config_dir) / "config.json").is_file():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return linear_params(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)))


def cuda_sync() -> None:
    """Wait for the CUDA kernels queued so far, where CUDA is in use; nothing on the CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def cuda_memory() -> dict[str, int | None]:
    """This process's peak CUDA memory in bytes: allocated by tensors, and reserved by PyTorch's caching
    allocator (what the card had to hold); None without CUDA."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {"peak_cuda": None, "peak_cuda_reserved": None}
    return {"peak_cuda": torch.cuda.max_memory_allocated(), "peak_cuda_reserved": torch.cuda.max_memory_reserved()}


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports kilobytes, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# --------------------------------------------------------------------------------------------
# GPUs: the card's peak, MFU, and a Qwen2.5-0.5B-shaped model with random weights

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched in order
# against torch.cuda.get_device_name(): the first pattern that matches wins, so the specific ones come
# first ("H100 PCIe" before "H100", "L40S" before "L4"; \b keeps "A100" and "A10G" from matching "A10").
GPU_PEAKS = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H200", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"RTX 4090", 165.0),
)


def gpu_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the card called `name`, in TFLOP/s; None for an unknown card or a MIG
    slice (a fraction of the card, whose share of the peak the name does not say)."""
    if "MIG" in name:
        return None
    return next((peak for pattern, peak in GPU_PEAKS if re.search(pattern, name, re.IGNORECASE)), None)


def mfu(tokens_per_s: float, n_params: int, factor: int, peak_flops: float) -> float:
    """Model FLOPs utilization: factor x N FLOPs per token (8N: 6N for the policy's forward and
    backward, 2N for the reference forward) at `tokens_per_s`, over the peak (FLOP/s)."""
    return factor * n_params * tokens_per_s / peak_flops


# Qwen2.5-0.5B's config.json (Hugging Face, Qwen/Qwen2.5-0.5B); the token ids come from the tokenizer
# carried in scripts/gpu/tokenizer (SmolLM2's, ids < 49152), the vocabulary (and so the head's cost) is
# Qwen's 151936.
QWEN05 = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 24,
    "use_cache": True,
}
# --dry-run's qwen05: the same model type, 2 narrow layers and the tokenizer's own vocabulary (49152):
# with Qwen's 151936 the head makes a CPU step about 3x slower, too slow to time enough steps quickly
QWEN05_DRY = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 49152,
}
TOKENIZER_DIR = Path(__file__).resolve().parent / "gpu" / "tokenizer"


def qwen05_dir(dest: Path, small: bool = False, seed: int = 0) -> Path:
    """Write a Hugging Face model directory to `dest`: Qwen2.5-0.5B's config (QWEN05; QWEN05_DRY's
    sizes if `small`) with random weights drawn from `seed` (saved in float32, as both tools train
    them), and the tokenizer files of scripts/gpu/tokenizer. Returns `dest`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = Qwen2Config(**(QWEN05 | (QWEN05_DRY if small else {})), **ids)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)  # transformers' own initialization (normal, std initializer_range)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for f in TOKENIZER_DIR.iterdir():
        if f.name not in ("NOTICE", "README.md"):
            shutil.copy(f, dest / f.name)
    return dest


# --------------------------------------------------------------------------------------------
# dpo-cli child: one run, one process


class _Capture:
    """Keeps dpo_cli's INFO log messages with the time each was logged."""

    def __init__(self) -> None:
        import logging

        self.records: list[tuple[float, str]] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: self.records.append((time.perf_counter(), record.getMessage()))  # type: ignore[method-assign]
        logger = logging.getLogger("dpo_cli")
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)

    def first(self, prefix: str) -> tuple[float, str] | None:
        return next(((t, m) for t, m in self.records if m.startswith(prefix)), None)


def dpo_cli_worker(spec: dict) -> dict:
    from hydra import compose, initialize_config_dir

    import dpo_cli.cli
    import dpo_cli.config
    import dpo_cli.train

    capture = _Capture()
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    dpo_cli.cli.register()
    with initialize_config_dir(config_dir=dpo_cli.cli.config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=spec["overrides"])
    os.chdir(run_dir)  # outside Hydra, train.run writes into the current directory
    started = time.perf_counter()
    cfg = dpo_cli.config.validate(cfg)  # the typed config, as dpo-train passes it to train.run
    dpo_cli.train.run(cfg)
    cuda_sync()  # CUDA kernels run asynchronously: the clock stops when the last one has finished
    ended = time.perf_counter()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step" in r and r.get("pairs_per_s")]
    batch = cfg.train.batch_size
    # "reference: ..." is logged at the end of the set-up (data, weights, reference); the training
    # steps follow. Timing from there leaves loading out; the difference of two runs cancels it anyway.
    reference = capture.first("reference: ")
    # reference.precompute=true: both run lengths precompute every pair once (the same data), so the
    # difference cancels it; its cost per pair is added back in `measure`.
    precomputed = capture.first("reference log-probs: computed for ")
    precompute = None
    if precomputed and (
        m := re.search(r"computed for (\d+) train \+ (\d+) eval examples in ([\d.]+) s", precomputed[1])
    ):
        precompute = float(m.group(3)) / max(1, int(m.group(1)) + int(m.group(2)))
    data_report = capture.first("data (the report")
    batches = capture.first("batches: ")  # the layout `auto` chose, and its LM head
    linear = None
    for where in (cfg.model.name_or_path, run_dir / "final"):
        if where and (linear := linear_params_of_dir(Path(str(where)))):
            break
    return {
        # All of train.run: the difference of two run lengths cancels loading (and precomputed
        # reference log-probs of the same data; their cost is added back per pair).
        "seconds": ended - started,
        "timed_from": "train.run's start",
        "run_seconds": ended - started,
        "steps": len(steps),
        # with logger.log_every=1 each row is one step: tokens per step = tokens/s / (pairs/s) x batch
        "tokens": sum(r["tokens_per_s"] / r["pairs_per_s"] * batch for r in steps),
        # dpo-cli's own figure: padding over the positions it computed (fewer than `tokens` when a
        # layout shares the prompt), mean over the steps
        "pad_share": statistics.mean(r.get("padding_share", 0.0) for r in steps) if steps else 0.0,
        "step_seconds": [batch / r["pairs_per_s"] for r in steps],
        "peak_rss": peak_rss_bytes(),
        **cuda_memory(),
        "linear_params": linear,
        "reference": reference[1].removeprefix("reference: ") if reference else None,
        "precompute_s_per_pair": precompute,
        "data_report": data_report[1] if data_report else None,
        "lr": float(cfg.optimizer.lr),
        "beta": float(getattr(cfg.loss, "beta", 0.1)),
        "settings": {
            "micro_batch_size": cfg.train.micro_batch_size,
            "mixed_precision": cfg.train.mixed_precision,
            "dtype": cfg.model.dtype,
            "layout": cfg.train.layout,
            "batches": batches[1].removeprefix("batches: ") if batches else None,
            "logits_chunk": cfg.train.logits_chunk,
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "reference_precompute": cfg.reference.precompute,
            "overrides": spec["overrides"],
        },
    }


# --------------------------------------------------------------------------------------------
# parent: plan, run the children, print the table


def child_env(device: str) -> dict[str, str]:
    """The children's environment. Offline: both tools load local directories only. OMP_NUM_THREADS
    (from --threads) reaches torch. --device cpu hides any GPU, so that dpo-cli (which takes the GPU
    when there is one) and TRL both stay on the CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env | ({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})


def run_child(cmd: list[str], result_file: Path, verbose: bool, env: dict[str, str]) -> dict:
    proc = subprocess.run(cmd + ["--result-file", str(result_file)], capture_output=not verbose, text=True, env=env)
    if proc.returncode != 0 or not result_file.exists():
        tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-25:])
        return {"error": f"exit {proc.returncode}" + (f"\n{tail}" if tail else "")}
    return json.loads(result_file.read_text())


def run_tool(
    tag: str, child, steps: tuple[int, int], repeat: int, verbose: bool, env: dict[str, str]
) -> dict[int, dict] | str:
    """Run a tool's children for both step counts, `repeat` times each (alternating, so that a slow
    spell on the machine hits both); `child(n, i)` gives the command and result file of a run.
    Returns {steps: combined run}, or why it failed."""
    done: dict[int, list[dict]] = {n: [] for n in steps}
    for i in range(repeat):
        for n in steps:
            cmd, result_file = child(n, i)
            print(f"[{tag}] {n} steps{f' (repeat {i + 1})' if repeat > 1 else ''} ...", flush=True)
            res = run_child(cmd, result_file, verbose, env)
            if "error" in res:
                print(f"[{tag}] FAILED: {res['error']}")
                return "a run failed: " + res["error"].splitlines()[-1]
            own = sum(res["step_seconds"])
            cuda = f", peak CUDA {res['peak_cuda'] / 2**30:.2f} GB" if res.get("peak_cuda") else ""
            print(
                f"[{tag}] {n} steps: {res['seconds']:.1f}s timed ({res['timed_from']}; the steps' own time "
                f"{own:.1f}s), peak RSS {res['peak_rss'] / 2**30:.2f} GB{cuda}",
                flush=True,
            )
            done[n].append(res)
    return {n: combine(runs) for n, runs in done.items()}


def matmul_peak(n: int = 2048, repeats: int = 7) -> float:
    """Best float32 n x n matmul rate on all of torch's threads, in FLOP/s (2 n^3 per product)."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.matmul(a, b, out=c)  # warm-up: thread pool, caches
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_factor(reference: str | None) -> int:
    """8 with reference log-probs (policy forward + backward = 6N, reference forward = 2N), live or
    precomputed (the timing includes precomputing them); 6 when no loss needs them."""
    if reference is None:
        return 8
    return 6 if reference.startswith("none") else 8


def combine(runs: list[dict]) -> dict:
    """The repeats of one run: the shortest time (the least disturbed by other work on the machine),
    the largest peak memory."""
    best = min(runs, key=lambda r: r["seconds"])
    peaks = {k: max((r.get(k) or 0 for r in runs), default=0) or None for k in ("peak_cuda", "peak_cuda_reserved")}
    return best | {"peak_rss": max(r["peak_rss"] for r in runs)} | peaks


def measure(label: str, a: dict, b: dict, steps: tuple[int, int], batch: int) -> dict:
    """One table row from the A-step and B-step runs of one tool (its share of the peak comes later)."""
    extra = steps[1] - steps[0]
    row = {"label": label, "all_tok_pair": b["tokens"] / (steps[1] * batch)}
    seconds = b["seconds"] - a["seconds"]
    inner = b["step_seconds"][1:] or b["step_seconds"]
    if seconds > 0:
        per_step, timed_by = seconds / extra, "difference of the two run lengths"
    elif inner:  # start-up noise (other work on the machine) swamped the extra steps' time
        per_step = statistics.median(inner)
        timed_by = (
            f"in-run median step: the {steps[1]}-step run took no longer than the {steps[0]}-step run "
            f"({b['seconds']:.1f}s vs {a['seconds']:.1f}s); for a clean figure: --repeat 2, or more steps"
        )
        print(f"bench: {label}: timed by the {timed_by}", file=sys.stderr)
    else:
        return row | {
            "error": f"its {steps[1]}-step run took no longer than its {steps[0]}-step run ({b['seconds']:.1f}s vs "
            f"{a['seconds']:.1f}s) and logged no step times: other work on the machine, or too few steps; try "
            "--repeat 2, or more steps"
        }
    per_step += batch * (b.get("precompute_s_per_pair") or 0.0)
    pairs_s = batch / per_step
    tok_pair = (b["tokens"] - a["tokens"]) / (extra * batch)
    row |= {
        "timed_by": timed_by,
        "s/step": per_step,
        "in-run": statistics.median(inner) if inner else float("nan"),
        "pairs/s": pairs_s,
        "tok/pair": tok_pair,
        "pad%": 100 * b["pad_share"],
        "tokens/s": tok_pair * pairs_s,
        "peak_rss": b["peak_rss"],
        "peak_cuda": b.get("peak_cuda"),
        "peak_cuda_reserved": b.get("peak_cuda_reserved"),
        "step_seconds": b["step_seconds"],
        "factor": b["factor"],
        "N": b["linear_params"],
        "settings": b.get("settings", {}),
    }
    row["flops"] = row["factor"] * row["N"] * row["tokens/s"] if row["N"] else float("nan")
    return row


COLUMNS = (
    "s/step",
    "in-run",
    "pairs/s",
    "tok/pair",
    "pad%",
    "tokens/s",
    "peak RSS",
    "peak CUDA",
    "reserved",
    "GFLOP/s",
    "MFU",
)


def _gb(n: int | None) -> str:
    return f"{n / 2**30:.2f} GB" if n else "-"


def display(row: dict) -> dict:
    if "error" in row:
        return (
            {"run": row["label"], "seq": str(row.get("seq") or "")} | dict.fromkeys(COLUMNS, "") | {"s/step": "FAILED"}
        )
    share = row.get("share")
    return {
        "run": row["label"],
        "seq": str(row.get("seq") or ""),
        "s/step": f"{row['s/step']:.2f}",
        "in-run": f"{row['in-run']:.2f}",
        "pairs/s": f"{row['pairs/s']:.3f}",
        "tok/pair": f"{row['tok/pair']:.0f}",
        "pad%": f"{row['pad%']:.0f}",
        "tokens/s": f"{row['tokens/s']:.0f}",
        "peak RSS": _gb(row["peak_rss"]),
        "peak CUDA": _gb(row["peak_cuda"]),
        "reserved": _gb(row["peak_cuda_reserved"]),
        "GFLOP/s": f"{row['flops'] / 1e9:.1f}",
        "MFU": "n/a" if share is None or math.isnan(share) else f"{100 * share:.1f}%",
    }


def ratio_row(ours: dict, trl: dict) -> dict:
    def x(key: str) -> str:
        return f"x{ours[key] / trl[key]:.2f}" if ours.get(key) and trl.get(key) else ""

    return (
        {"run": f"{ours['label']} / TRL", "seq": str(ours.get("seq") or "")}
        | dict.fromkeys(COLUMNS, "")
        | {
            "s/step": x("s/step"),
            "pairs/s": x("pairs/s"),
            "tok/pair": x("tok/pair"),
            "tokens/s": x("tokens/s"),
            "peak RSS": x("peak_rss"),
            "peak CUDA": x("peak_cuda"),
            "reserved": x("peak_cuda_reserved"),
            "GFLOP/s": x("flops"),
            "MFU": x("share"),
        }
    )


def fmt_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}

    def line(r: dict) -> str:
        return "  ".join(str(r[c]).rjust(widths[c]) if i else str(r[c]).ljust(widths[c]) for i, c in enumerate(cols))

    return "\n".join([line({c: c for c in cols}), line({c: "-" * widths[c] for c in cols})] + [line(r) for r in rows])


def parse_steps(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes A,B (two step counts), got {text!r}") from None
    if not 1 <= a < b:
        raise argparse.ArgumentTypeError(f"--steps A,B needs 1 <= A < B, got {text!r}")
    return a, b


def parse_seqs(text: str) -> tuple[int, ...]:
    try:
        seqs = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seq takes lengths in tokens, comma-separated, got {text!r}") from None
    if not seqs or min(seqs) < 16:
        raise argparse.ArgumentTypeError(f"--seq needs lengths of at least 16 tokens, got {text!r}")
    return seqs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2", help="comma-separated: smollm2 (default), tiny, qwen05")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when torch sees a GPU, else cpu"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 on cuda, fp32 on cpu; bf16 = float32 weights with bf16 autocast in both tools",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"a quick end-to-end check: qwen05 shrunk to 2 narrow layers, batch {DRY_RUN['batch']}, length "
        f"{DRY_RUN['seq'][0]}, runs of {DRY_RUN['steps'][0]} and {DRY_RUN['steps'][1]} steps (figures meaningless)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure, setting, version and target as JSON")
    parser.add_argument(
        "--batch", type=int, default=None, help="pairs per optimizer step (default: smollm2 4, tiny 64, qwen05 8)"
    )
    parser.add_argument("--micro", type=int, default=None, help="dpo-cli's pairs per forward (default: = --batch)")
    parser.add_argument(
        "--seq",
        type=parse_seqs,
        default=None,
        help="max length(s) in tokens, comma-separated, one measurement each (default: smollm2 512, qwen05 "
        "1024,2048; synthetic data: its own 32)",
    )
    parser.add_argument(
        "--steps",
        type=parse_steps,
        default=None,
        help="the two run lengths A,B in optimizer steps (default: smollm2 2,6; tiny 5,25; qwen05 3,8)",
    )
    parser.add_argument(
        "--lengths",
        choices=("hh", "fixed"),
        default=None,
        help="hh: varied dialogue lengths, some truncated; fixed: every sequence exactly --seq tokens "
        "(default: fixed for qwen05, hh otherwise)",
    )
    parser.add_argument(
        "--data",
        choices=("auto", "synthetic", "hh"),
        default="auto",
        help="auto: synthetic for tiny, hh for smollm2 and qwen05",
    )
    parser.add_argument("--seed", type=int, default=0, help="data, model init and data order (train.seed, TRL seed)")
    parser.add_argument("--repeat", type=int, default=1, help="run each child this many times; the fastest counts")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in every run and the matmul peak (default: torch's)"
    )
    parser.add_argument("--no-trl", action="store_true", help="dpo-cli rows only")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for every dpo-cli run (repeatable), e.g. reference.precompute=true",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE,...",
        help="one dpo-cli row per variant with these extra overrides (repeatable), e.g. lora:model.lora.r=16",
    )
    parser.add_argument(
        "--trl-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a DPOConfig field for TRL's runs (repeatable; JSON values), e.g. gradient_checkpointing=false",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the children's output and dpo-cli's data report"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.names = [n.strip() for n in args.models.split(",") if n.strip()]
    if unknown := [n for n in args.names if n not in MODELS]:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    if bad := [item for item in args.trl_arg + args.override if "=" not in item]:
        parser.error(f"not KEY=VALUE: {bad}")
    if args.repeat < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeat and --threads must be >= 1")
    return args


def resolve_device(args: argparse.Namespace) -> str | None:
    """Turn --device auto and --dtype auto into choices (on `args`); say why the run cannot go on, if so."""
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    if args.device == "cuda" and not cuda:
        return "--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu"
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return None


def data_of(name: str, args: argparse.Namespace) -> str:
    return MODELS[name]["data"] if args.data == "auto" else args.data


def seqs_of(name: str, args: argparse.Namespace) -> tuple[int | None, ...]:
    """The lengths measured for a model: --seq, else --dry-run's, else the model's; (None,) for the
    synthetic task's own."""
    if args.seq:
        return args.seq
    if data_of(name, args) != "hh":
        return (None,)
    return DRY_RUN["seq"] if args.dry_run else (MODELS[name]["seq"] or (512,))


def plan(name: str, seq: int | None, args: argparse.Namespace, hf_dir: Path | None) -> dict:
    """One measurement: a model at one length, its sizes from the flags, else --dry-run's, else the model's."""
    m, dry = MODELS[name], (DRY_RUN if args.dry_run else {})
    batch = args.batch or dry.get("batch") or m["batch"]
    micro = min(args.micro or batch, batch)
    while batch % micro:
        micro -= 1
    return {
        "name": name,
        "hf_dir": hf_dir or m["hf_dir"],
        "overrides": list(m["overrides"]) + ([f"model.name_or_path={hf_dir}"] if hf_dir else []),
        "data": data_of(name, args),
        "lengths": args.lengths or m["lengths"],
        "batch": batch,
        "micro": micro,
        "seq": seq,
        "max_prompt": seq // 2 if seq else None,
        "steps": args.steps or dry.get("steps") or m["steps"],
    }


def dpo_cli_overrides(p: dict, n_steps: int, data_file: Path | None, args: argparse.Namespace) -> list[str]:
    overrides = p["overrides"] + [
        "logger.wandb.mode=disabled",
        "logger.progress=false",
        "logger.report=false",  # drawing report.png is neither training nor what TRL does
        "logger.log_every=1",
        f"train.max_steps={n_steps}",
        f"train.batch_size={p['batch']}",
        f"train.micro_batch_size={p['micro']}",
        "train.eval_every=null",
        "train.save_every=null",
        f"train.seed={args.seed}",
    ]
    if args.dtype == "bf16":
        # float32 master weights (model.dtype's default), bf16 autocast: what TRL's bf16=True does
        overrides.append("train.mixed_precision=bf16")
    if p["data"] == "synthetic":
        # the same generated set for both run lengths, so that their set-up is the same
        overrides += [f"data.format.num_train={p['batch'] * p['steps'][1]}", "data.format.num_eval=1"]
    else:
        overrides += ["data=hh", f"data.path={data_file}", "data.eval_holdout=0", "data.cache_dir=null"]
        if p["name"] == "tiny" and p["seq"] > 1024:
            overrides.append(f"model.random_init.max_position_embeddings={p['seq']}")
    if p["seq"] is not None:
        overrides += [f"data.max_length={p['seq']}", f"data.max_prompt_length={p['max_prompt']}"]
    return overrides + args.override


def parse_trl_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def bench_data(p: dict, args: argparse.Namespace, tmp: Path) -> tuple[dict[int, Path | None], dict[str, float]]:
    """The HH file each run length reads (none for synthetic data) and the token-length table's
    tokens per pair for each tool (printed here)."""
    name, batch, steps = p["name"], p["batch"], p["steps"]
    if p["data"] != "hh":
        return dict.fromkeys(steps), {}
    triples = make_pairs(batch * steps[1], p["lengths"], p["seq"], args.seed)
    # Both runs read the same pairs in the same seeded order, so the shorter run's steps are
    # exactly the first steps of the longer one and the difference is the longer run's last steps.
    path = tmp / f"hh_{name}_{p['seq']}.jsonl"
    write_hh(path, triples)
    expected: dict[str, float] = {}
    if p["hf_dir"] is not None:
        text, expected = length_report(token_lengths(p["hf_dir"], triples), p["seq"], p["max_prompt"])
        print(f"token lengths ({p['hf_dir'].name} tokenizer, EOS included; the {len(triples)} pairs of run B):")
        print(text)
    return dict.fromkeys(steps, path), expected


def bench_model(p: dict, args: argparse.Namespace, tmp: Path, want_trl: bool) -> list[dict]:
    """Run every dpo-cli variant and TRL for one model at one length; return the measured rows."""
    name, batch, steps, env = p["name"], p["batch"], p["steps"], child_env(args.device)
    lengths = f" ({p['lengths']} lengths)" if p["data"] == "hh" else ""
    print(
        f"\n== {name}: {p['data']} data{lengths}, batch {batch} "
        f"(dpo-cli micro {p['micro']}), max length {p['seq'] or 'the task default'}"
        + (f", max prompt length {p['max_prompt']} (dpo-cli)" if p["seq"] else "")
        + f", runs of {steps[0]} and {steps[1]} steps, {args.device} {args.dtype}",
        flush=True,
    )
    files, expected = bench_data(p, args, tmp)
    results: list[dict] = []
    first: dict | None = None
    for label, _, extra in [v.partition(":") for v in args.variant] or [("", "", "")]:
        tag = f"dpo-cli/{label}" if label else "dpo-cli"

        def child(n: int, i: int, label: str = label, extra: str = extra) -> tuple[list[str], Path]:
            spec = {
                "run_dir": str(tmp / f"run_{name}_{p['seq']}_{label or 'base'}_{n}_{i}"),
                "overrides": dpo_cli_overrides(p, n, files[n], args) + [o for o in extra.split(",") if o],
            }
            return [sys.executable, __file__, "--worker", json.dumps(spec)], Path(spec["run_dir"] + ".json")

        runs = run_tool(tag, child, steps, args.repeat, args.verbose, env)
        if isinstance(runs, str):
            results.append({"label": tag, "error": runs})
            continue
        b = runs[steps[1]]
        print(f"[{tag}] reference: {b['reference']}")
        if args.verbose and b["data_report"]:
            print(b["data_report"])
        for r in runs.values():
            r["factor"] = flops_factor(r["reference"])
        first = first or b
        results.append(measure(tag, runs[steps[0]], b, steps, batch))

    if want_trl and p["data"] == "hh" and p["hf_dir"] is not None:
        results.append(trl_row(p, args, tmp, files, first))
    # A LoRA run's final/ holds an adapter: its N (the base model's linear layers) is any other run's.
    known = next((r["N"] for r in results if r.get("N")), None)
    settings = {k: p[k] for k in ("data", "lengths", "batch", "micro", "seq", "max_prompt", "steps")}
    for row in results:
        row |= {"model": name, "seq": p["seq"], "plan": settings | {"device": args.device, "dtype": args.dtype}}
        if "N" in row and not row["N"] and known:
            row["N"] = known
            row["flops"] = row["factor"] * known * row["tokens/s"]
    if expected:
        check_tokens(results, expected, batch * steps[1])
    return results


def trl_row(p: dict, args: argparse.Namespace, tmp: Path, files: dict, first: dict | None) -> dict:
    """TRL's runs for one model at one length, on the same pairs, batch, length and precision."""
    name, batch, steps = p["name"], p["batch"], p["steps"]
    # TRL gets dpo-cli's learning rate and beta (from the first dpo-cli row's config)
    lr, beta = (first["lr"], first["beta"]) if first else (5e-7, 0.1)
    if not first:
        print(f"[TRL] no dpo-cli run finished: using dpo-cli's documented defaults lr={lr}, beta={beta}")

    def trl_child(n: int, i: int) -> tuple[list[str], Path]:
        spec = {
            "model_dir": str(p["hf_dir"]),
            "data_file": str(files[n]),
            "batch": batch,
            "max_length": p["seq"],
            "steps": n,
            "lr": lr,
            "beta": beta,
            "seed": args.seed,
            "use_cpu": args.device == "cpu",
            "bf16": args.dtype == "bf16",
            "output_dir": str(tmp / f"trl_{name}_{p['seq']}_{n}_{i}"),
            "trl_args": parse_trl_args(args.trl_arg),
            "verbose": args.verbose,
        }
        return [sys.executable, str(TRL_WORKER), "--spec", json.dumps(spec)], Path(spec["output_dir"] + ".json")

    runs = run_tool("TRL", trl_child, steps, args.repeat, args.verbose, child_env(args.device))
    if isinstance(runs, str):
        return {"label": "TRL", "error": runs}
    b = runs[steps[1]]
    print("[TRL] DPOConfig as run: " + ", ".join(f"{k}={v}" for k, v in b["settings"].items()))
    if b["train_pairs"] != batch * steps[1]:
        print(f"[TRL] kept {b['train_pairs']} of {batch * steps[1]} pairs (it drops prompts >= max_length)")
    for r in runs.values():
        r["factor"] = 6 if r["settings"]["precompute_ref_log_probs"] else 8
    return measure("TRL", runs[steps[0]], b, steps, batch)


def check_tokens(results: list[dict], expected: dict[str, float], n_pairs: int) -> None:
    """Non-padding tokens per pair over all of run B (every pair once): each tool's count against
    the token-length table, and dpo-cli's against TRL's."""
    counted = [r for r in results if "all_tok_pair" in r]
    if not counted:
        return
    print(f"non-padding tokens per pair trained in run B ({n_pairs} pairs, each once), counted by each tool:")
    for r in counted:
        want = expected["TRL" if r["label"] == "TRL" else "dpo-cli"]
        off = 100 * (r["all_tok_pair"] / want - 1)
        note = "as the table says" if abs(off) < 0.5 else f"{off:+.1f}% vs the table's {want:.1f}"
        print(f"  {r['label']:16} {r['all_tok_pair']:8.1f}  ({note})")
    trl = next((r for r in counted if r["label"] == "TRL"), None)
    for r in counted:
        if trl and r is not trl:
            diff = 100 * (r["all_tok_pair"] / trl["all_tok_pair"] - 1)
            verdict = "MORE than 3% apart" if abs(diff) > 3 else "within 3%"
            print(f"  {r['label']} vs TRL: {diff:+.1f}% ({verdict})")


MEMORY_NAMES = {"peak_rss": "peak RSS", "peak_cuda": "peak CUDA memory (allocated)"}


def targets(rows: list[dict], device: str) -> list[dict]:
    """TARGETS[device] for every dpo-cli row: its speed and memory against TRL's at the same model and
    length, and on CUDA its MFU at MFU_TARGET_AT. `met` is None where a figure is missing."""
    t, out = TARGETS[device], []
    done = [r for r in rows if "error" not in r]
    for r in done:
        if r["label"] == "TRL":
            continue
        where = {"model": r["model"], "seq": r["seq"], "label": r["label"]}
        trl = next((x for x in done if x["label"] == "TRL" and (x["model"], x["seq"]) == (r["model"], r["seq"])), None)
        if trl:
            key = t["memory_of"]
            speed = r[t["speed_of"]] / trl[t["speed_of"]]
            mem = r[key] / trl[key] if r.get(key) and trl.get(key) else None
            out.append(
                where
                | {
                    "target": f">= {t['speedup']:g}x TRL's {t['speed_of']} at <= {t['memory']:g}x its "
                    f"{MEMORY_NAMES[key]}",
                    "speedup": speed,
                    "memory": mem,
                    "met": None if mem is None else speed >= t["speedup"] and mem <= t["memory"],
                }
            )
        if "mfu" in t and (r["model"], r["seq"]) == MFU_TARGET_AT:
            share = _finite(r.get("share"))
            out.append(
                where
                | {
                    "target": f">= {100 * t['mfu']:.0f}% MFU (8N) against the card's dense bf16 peak",
                    "mfu": share,
                    "met": None if share is None else share >= t["mfu"],
                }
            )
    return out


def _where(r: dict) -> str:
    """'qwen05 2048 dpo-cli': a row's model, length (if set) and label."""
    return " ".join(str(x) for x in (r["model"], r.get("seq"), r["label"]) if x)


def target_line(t: dict) -> str:
    figures = (
        f"x{t['speedup']:.2f} speed, " + (f"x{t['memory']:.2f} memory" if t["memory"] is not None else "memory n/a")
        if "speedup" in t
        else (f"MFU {100 * t['mfu']:.1f}%" if t["mfu"] is not None else "MFU n/a")
    )
    verdict = {True: "met", False: "NOT met", None: "unknown"}[t["met"]]
    return f"target: {t['target']}; {_where(t)}: {figures}: {verdict}"


NOTES = (
    "\ns/step = (time of the B-step run - time of the A-step run) / (B - A): both runs train on the same pairs in "
    "the same order, so this is the B-step run's last B - A steps, start-up and warm-up cancelled (with "
    "precomputed reference log-probs, their measured cost per pair x the batch is added); on CUDA each child "
    "synchronizes before it reads the clock; in-run = median step time inside run B, its first step left out "
    "(dpo-cli's metrics.jsonl, TRL's step callbacks).\n"
    "tok/pair = non-padding tokens per pair in those B - A steps, prompt counted with each response as a padded "
    "trainer computes it; pad% = padding share of the positions each tool computed; tokens/s = tok/pair x pairs/s "
    "(one process on one device: per GPU on CUDA).\n"
    "peak RSS = the B-step child's max resident set, model loading (and a reference copy) included; peak CUDA = "
    "its torch.cuda.max_memory_allocated(), reserved = max_memory_reserved() (what the caching allocator held).\n"
    "GFLOP/s = F x N x tokens/s, N = parameters of the nn.Linear layers (lm_head included even when tied, "
    "embedding lookup excluded), F = 8 with reference log-probs (6N policy forward + backward + 2N reference "
    "forward; precomputed ones are timed too), 6 without; attention scores and recomputation (gradient "
    "checkpointing) are not counted, and a prompt is credited once per response even where a layout computes it "
    "once for both, so a share can pass 100%. MFU = GFLOP/s / the peak: on CUDA the card's dense bf16 peak "
    "(GPU_PEAKS), on the CPU the measured float32 matmul peak."
)


def print_summary(rows: list[dict], args: argparse.Namespace, has_trl: bool, names: list[str], goals: list) -> None:
    table = []
    for name in names:
        for seq in dict.fromkeys(r["seq"] for r in rows if r["model"] == name):
            mine = [r for r in rows if r["model"] == name and r["seq"] == seq]
            trl = next((r for r in mine if r["label"] == "TRL" and "error" not in r), None)
            table += [{"model": name} | display(r) for r in mine]
            if trl:
                table += [{"model": name} | ratio_row(r, trl) for r in mine if r is not trl and "error" not in r]
    print()
    print(fmt_table(table))
    for r in rows:
        if "error" in r:
            print(f"{_where(r)} FAILED: {r['error']}")
    print(NOTES)
    terms = {f"{r['model']} {r['label']}: F={r['factor']}, N={r['N'] / 1e6:.2f}M" for r in rows if r.get("N")}
    if terms:
        print("  " + "; ".join(sorted(terms)))
    for goal in goals:
        print(target_line(goal))
    if not has_trl:
        print('TRL skipped: trl is not installed (pip install -e ".[parity]" installs the pinned trl==1.16.0).')
    elif args.no_trl:
        print("TRL skipped (--no-trl).")
    elif not any(r["label"] == "TRL" for r in rows):
        print("TRL skipped: it needs a Hugging Face model directory (the tiny model is built in code).")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _finite(x: float | None) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def json_row(r: dict) -> dict:
    """One row of --json: a tool at a model and length, every figure in base units (bytes, seconds)."""
    row = {"model": r["model"], "seq": r["seq"], "tool": "TRL" if r["label"] == "TRL" else "dpo-cli"}
    row |= {"label": r["label"], "plan": r.get("plan")}
    if "error" in r:
        return row | {"error": r["error"]}
    return row | {
        "pairs_per_s": r["pairs/s"],
        "tokens_per_s": r["tokens/s"],
        "tokens_per_s_per_gpu": r["tokens/s"] if r["plan"]["device"] == "cuda" else None,
        "tokens_per_pair": r["tok/pair"],
        "padding_percent": r["pad%"],
        "step_seconds": r["s/step"],
        "in_run_step_seconds": _finite(r["in-run"]),
        "timed_by": r["timed_by"],
        "run_b_step_seconds": r["step_seconds"],
        "flops_per_s": _finite(r["flops"]),
        "mfu": _finite(r.get("share")),
        "flops_factor": r["factor"],
        "n_params": r["N"],
        "peak_rss_bytes": r["peak_rss"],
        "peak_cuda_allocated_bytes": r["peak_cuda"],
        "peak_cuda_reserved_bytes": r["peak_cuda_reserved"],
        "settings": r["settings"],
    }


def device_info(args: argparse.Namespace, matmul: float | None) -> dict:
    """The device the runs used, its peak (the MFU denominator) and the library versions."""
    import torch

    info: dict = {"device": args.device, "dtype": args.dtype, "host": platform.node(), "cpus": os.cpu_count()}
    info["versions"] = {"python": platform.python_version(), "torch": torch.__version__} | {
        p: version(p) for p in ("transformers", "trl", "accelerate")
    }
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = gpu_peak_tflops(name)
        source = "dense bf16, GPU_PEAKS table" if peak else "unknown card: no MFU"
        return info | {"name": name, "peak_tflops": peak, "peak_source": source}
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    name = name or platform.processor() or platform.machine()
    source = f"measured float32 2048 x 2048 matmul, {torch.get_num_threads()} threads"
    return info | {"name": name, "peak_tflops": matmul / 1e12 if matmul else None, "peak_source": source}


def write_json(path: str, rows: list[dict], info: dict, goals: list[dict], args: argparse.Namespace) -> None:
    report = info | {
        "dry_run": args.dry_run,
        "models": sorted({r["model"] for r in rows}),
        "rows": [json_row(r) for r in rows],
        "targets": goals,
        "targets_met": all(g["met"] for g in goals) if goals else None,
        "ok": not any("error" in r for r in rows) and not getattr(args, "stopped", None),
        "stopped": getattr(args, "stopped", None),  # SIGTERM (a time limit): the rows measured before it
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


def build_models(names: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, Path]:
    """Write the model directories that are made at run time (qwen05's) into `tmp`."""
    dirs = {}
    if "qwen05" in names:
        started = time.perf_counter()
        dirs["qwen05"] = qwen05_dir(tmp / "qwen05", small=args.dry_run, seed=args.seed)
        n = linear_params_of_dir(dirs["qwen05"])
        print(
            f"qwen05: Qwen2.5-0.5B's config{' shrunk for --dry-run' if args.dry_run else ''}, random weights "
            f"(seed {args.seed}), SmolLM2's tokenizer: N = {n / 1e6:.1f}M linear parameters, written in "
            f"{time.perf_counter() - started:.1f}s to {dirs['qwen05']}"
        )
    return dirs


class Stopped(Exception):
    """SIGTERM (a time limit, e.g. scripts/gpu/check.sh's): the rows measured so far are kept."""


def _stopped(signum: int, _frame) -> None:
    raise Stopped(f"signal {signum}")


def run_all(names: list[str], args: argparse.Namespace, want_trl: bool) -> list[dict]:
    """Every model and length, in the order given; on SIGTERM, the lengths finished so far (the
    running child is killed), so that a time limit leaves the figures already measured."""
    tmp = Path(tempfile.mkdtemp(prefix="dpo_bench."))
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, _stopped)
    try:
        dirs = build_models(names, args, tmp)
        for name in names:
            for seq in seqs_of(name, args):
                rows += bench_model(plan(name, seq, args, dirs.get(name)), args, tmp, want_trl)
    except Stopped as e:
        print(f"\nbench: stopped by {e} after {len(rows)} measured row(s); those are reported")
        args.stopped = str(e)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if args.keep:
            print(f"\nrun directories kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        Path(args.result_file).write_text(json.dumps(dpo_cli_worker(json.loads(args.worker))))
        return 0
    names = list(args.names)
    if "smollm2" in names and not (SMOLLM2_DIR / "config.json").is_file():
        print(f"skipping smollm2: {SMOLLM2_DIR} not found (make it with: make smollm2)")
        names.remove("smollm2")
    has_trl = importlib.util.find_spec("trl") is not None
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch starts, here and in the children
    if problem := resolve_device(args):
        print(f"bench: {problem}")
        return 2

    import torch

    info = device_info(args, None)
    print(
        f"dpo-cli bench: {platform.node()} | {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f} | python {platform.python_version()} | "
        + " | ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "python")
    )
    print(f"device: {args.device} ({info['name']}), {args.dtype}" + (", --dry-run" if args.dry_run else ""))
    for name in names:  # read the weights once, so that no tool's first run pays for a cold disk
        for f in Path(MODELS[name]["hf_dir"] or "/nonexistent").glob("*.safetensors"):
            with f.open("rb") as fh:
                while fh.read(1 << 24):
                    pass
    peak = None
    if args.device == "cpu":
        # Measured before and after the runs, the higher counting: other work on the machine lowers it.
        peak = matmul_peak()
        print(
            f"matmul peak: {peak / 1e9:.1f} GFLOP/s (float32 2048 x 2048 torch.matmul, best of 7, "
            f"{torch.get_num_threads()} threads; measured again after the runs)"
        )
    else:
        print(f"peak: {info['peak_tflops'] or 'unknown card: no MFU'} TFLOP/s ({info['peak_source']})")
    rows = run_all(names, args, has_trl and not args.no_trl)
    if not rows:
        print("bench: nothing was run")
        return 1
    return finish(rows, args, has_trl, names, info, peak)


def finish(rows: list[dict], args, has_trl: bool, names: list[str], info: dict, peak: float | None) -> int:
    """MFU for every row, the table, the targets, the JSON; the exit code (1 if a run failed)."""
    if args.device == "cpu":
        after = matmul_peak()
        print(f"\nmatmul peak after the runs: {after / 1e9:.1f} GFLOP/s; the table uses {max(peak, after) / 1e9:.1f}")
        info = device_info(args, max(peak, after))
    peak_flops = info["peak_tflops"] * 1e12 if info["peak_tflops"] else None
    for row in rows:
        if "flops" in row:
            row["share"] = (
                mfu(row["tokens/s"], row["N"], row["factor"], peak_flops) if peak_flops and row["N"] else None
            )
    goals = targets(rows, args.device)
    print_summary(rows, args, has_trl, names, goals)
    if args.json:
        write_json(args.json, rows, info, goals, args)
    if getattr(args, "stopped", None):
        print(f"bench: incomplete (stopped by {args.stopped})")
        return 1
    failed = [r for r in rows if "error" in r]
    if failed:
        what = ", ".join(_where(r) for r in failed)
        print(f"bench: {len(failed)} run(s) failed ({what}): {failed[0]['error'].splitlines()[-1]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
