#!/usr/bin/env python
"""Training-step throughput of dpo-cli's own code path: pairs/s, tokens/s, peak RSS.

Each model is benchmarked in a fresh child process (so peak RSS is its own), which composes
the config with Hydra's compose API exactly as `dpo-train` does, chdirs into a temporary run
directory and calls `dpo_cli.train.run(cfg)`. Step times come from the run's metrics.jsonl
(`tokens_per_s`, `pairs_per_s`, logged every step); the first `--warmup` steps are dropped and
the median of the rest is reported. Prints figures only; asserts nothing.

    python scripts/bench.py                                  # tiny, and smollm2 if converted
    python scripts/bench.py --models smollm2 --steps 10 --batch 4 --seq 512
    python scripts/bench.py --models smollm2 --variant live: --variant lora:model.lora.r=16 \
        --variant precompute:reference.precompute=true,reference.cache_dir=null   # one row each

Data: model=tiny uses the built-in synthetic task (short sequences); smollm2 uses a generated
HH-format file whose prompts and responses are long enough that every sequence is cut to exactly
--seq tokens (default 256), so tokens per step are fixed. `--data hh` gives tiny the same.
SmolLM2 needs a local copy: python scripts/fetch_smollm2.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = ROOT / "models" / "smollm2-135m-instruct"

# Per-model defaults: a CPU-sized batch that keeps the default run within a few minutes on 2 cores.
MODELS = {
    "tiny": {"overrides": ["model=tiny"], "data": "synthetic", "batch": 64, "micro": 32, "steps": 20},
    "smollm2": {
        "overrides": ["model=smollm2", f"model.name_or_path={SMOLLM2_DIR}"],
        "data": "hh",
        "batch": 2,
        "micro": 2,
        "steps": 5,
    },
}
DEFAULT_HH_SEQ = 256

WORDS = (
    "the a model learns from pairs of answers where one is preferred and the other is not so the "
    "policy moves toward better responses while staying close to its reference we measure how fast "
    "each training step runs on this machine with real text long enough to fill the whole sequence "
    "people often ask about cooking travel science history music code health money and weather "
    "good answers are clear short polite correct and helpful bad answers are vague wrong or rude"
).split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
    return " ".join(words).capitalize() + "."


def text(rng: random.Random, n_words: int) -> str:
    out: list[str] = []
    while sum(len(s.split()) for s in out) < n_words:
        out.append(sentence(rng))
    return " ".join(out)


def write_hh(path: Path, n_rows: int, seq: int, seed: int = 0) -> None:
    """HH-format rows whose prompt and responses each exceed `seq` tokens under any tokenizer
    with at least one token per word, so truncation makes every sequence exactly `seq` long."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n_rows):
            dialogue = (
                "".join(f"\n\nHuman: {text(rng, seq // 4)}\n\nAssistant: {text(rng, seq // 4)}" for _ in range(2))
                + f"\n\nHuman: {text(rng, seq // 4)}"
            )
            chosen = f"{dialogue}\n\nAssistant: {text(rng, seq)}"
            rejected = f"{dialogue}\n\nAssistant: {text(rng, seq)}"
            f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")


# --------------------------------------------------------------------------------------------
# child: one model, one process


class _Capture:
    """Keeps dpo_cli's INFO log messages (to read the parameter count and data report)."""

    def __init__(self) -> None:
        import logging

        self.messages: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: self.messages.append(record.getMessage())  # type: ignore[method-assign]
        logger = logging.getLogger("dpo_cli")
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


def worker(spec: dict) -> dict:
    from hydra import compose, initialize_config_dir

    import dpo_cli.cli
    import dpo_cli.train

    capture = _Capture()
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    dpo_cli.cli.register()
    with initialize_config_dir(config_dir=dpo_cli.cli.config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=spec["overrides"])
    os.chdir(run_dir)  # outside Hydra, train.run writes into the current directory
    started = time.perf_counter()
    last = dpo_cli.train.run(cfg)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "step" in r and "tokens_per_s" in r]
    params = next((m.group(1) for msg in capture.messages if (m := re.search(r"/ ([\d.]+M) parameters", msg))), "?")
    return {
        "rows": train_rows,
        "last_tokens_per_s": last.get("tokens_per_s"),
        "wall_s": wall,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "params": params,
    }


# --------------------------------------------------------------------------------------------
# parent: plan, run children, print the table


def plan(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    m = MODELS[name]
    batch = args.batch or m["batch"]
    micro = min(args.micro or m["micro"], batch)
    while batch % micro:
        micro -= 1
    data = m["data"] if args.data == "auto" else args.data
    steps = args.steps or m["steps"]
    total = args.warmup + steps
    overrides = list(m["overrides"]) + [
        "logger=local",
        "logger.progress=false",
        "logger.log_every=1",
        f"train.max_steps={total}",
        f"train.batch_size={batch}",
        f"train.micro_batch_size={micro}",
        "train.eval_every=null",
        "train.save_every=null",
        f"train.seed={args.seed}",
    ]
    if data == "synthetic":
        seq = args.seq  # None: the synthetic task's own max_length (its sequences are short)
        overrides += [
            "data=synthetic",
            f"data.synthetic.num_train={max(batch * total, 256)}",
            "data.synthetic.num_eval=1",
        ]
    else:
        seq = args.seq or DEFAULT_HH_SEQ
        path = tmp / f"hh_{seq}.jsonl"
        if not path.exists():
            write_hh(path, max(batch * total, 16), seq)
        overrides += ["data=hh", f"data.path={path}", "data.eval_holdout=0"]
        if name == "tiny" and seq > 256:
            overrides.append(f"model.random_init.max_position_embeddings={seq}")
    if seq is not None:
        overrides += [f"data.max_length={seq}", f"data.max_prompt_length={seq // 2}"]
    return {
        "name": name,
        "data": data,
        "seq": seq,
        "batch": batch,
        "micro": micro,
        "overrides": overrides + args.override,
        "run_dir": str(tmp / f"run_{name}"),
    }


def run_child(spec: dict, verbose: bool) -> dict:
    result_file = Path(spec["run_dir"] + ".result.json")
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--result-file", str(result_file)]
    proc = subprocess.run(cmd, capture_output=not verbose, text=True)
    if proc.returncode != 0 or not result_file.exists():
        tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-25:])
        return {"error": f"exit {proc.returncode}" + (f"\n{tail}" if tail else "")}
    return json.loads(result_file.read_text())


def summarize(spec: dict, res: dict, warmup: int) -> dict:
    rows = sorted(res["rows"], key=lambda r: r["step"])
    measured = [r for r in rows if r["step"] > warmup] or rows
    tps = [r["tokens_per_s"] for r in measured]
    pps = [r["pairs_per_s"] for r in measured]
    med_pps, med_tps = statistics.median(pps), statistics.median(tps)
    return {
        "model": spec["name"],
        "params": res["params"],
        "data": spec["data"],
        "batch": f"{spec['batch']}/{spec['micro']}",
        # tokens per step / pairs per step = non-pad tokens of chosen + rejected per pair
        "tok/seq": f"{med_tps / med_pps / 2:.0f}",
        "steps": f"{len(measured)}",
        "s/step": f"{spec['batch'] / med_pps:.2f}",
        "pairs/s": f"{med_pps:.2f}",
        "tokens/s": f"{med_tps:.0f}",
        "tok/s min-max": f"{min(tps):.0f}-{max(tps):.0f}",
        "peak RSS": f"{res['peak_rss_kb'] / 1024:.0f} MB",
        "wall": f"{res['wall_s']:.0f}s",
    }


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}

    def line(r: dict) -> str:
        return "  ".join(str(r[c]).rjust(widths[c]) if i else str(r[c]).ljust(widths[c]) for i, c in enumerate(cols))

    return "\n".join([line({c: c for c in cols}), line({c: "-" * widths[c] for c in cols})] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 (smollm2 is skipped if not converted)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="measured optimizer steps per model (default: tiny 20, smollm2 5)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and not measured (default 2)")
    parser.add_argument(
        "--batch", type=int, default=None, help="pairs per optimizer step (default: tiny 64, smollm2 2)"
    )
    parser.add_argument("--micro", type=int, default=None, help="pairs per forward pass (default: tiny 32, smollm2 2)")
    parser.add_argument(
        "--seq",
        type=int,
        default=None,
        help=f"data.max_length in tokens (default: {DEFAULT_HH_SEQ} for hh data; synthetic: its own 32)",
    )
    parser.add_argument(
        "--data",
        choices=("auto", "synthetic", "hh"),
        default="auto",
        help="auto: synthetic for tiny, generated long HH dialogues for smollm2",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for every model (repeatable), e.g. train.mixed_precision=bf16",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE,...",
        help="run each model once per variant with these extra overrides (repeatable), e.g. lora:model.lora.r=16",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the children's output")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        Path(args.result_file).write_text(json.dumps(worker(json.loads(args.worker))))
        return 0
    if (args.steps is not None and args.steps < 1) or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    if "smollm2" in names and not (SMOLLM2_DIR / "config.json").is_file():
        print(f"skipping smollm2: {SMOLLM2_DIR} not found (make it with: python scripts/fetch_smollm2.py)")
        names.remove("smollm2")

    import torch

    print(
        f"dpo-cli bench: {platform.node()} | {os.cpu_count()} CPUs | torch {torch.__version__} "
        f"({torch.get_num_threads()} threads) | python {platform.python_version()}"
    )
    print(f"{args.warmup} warmup steps per model, then the measured ones; figures are medians over the measured steps")
    tmp_ctx = tempfile.TemporaryDirectory(prefix="dpo_bench.")
    tmp = Path(tmp_ctx.name)
    results, failed = [], 0
    try:
        variants = [v.partition(":") for v in args.variant] or [("", "", "")]
        for name, (label, _, extra) in ((n, v) for n in names for v in variants):
            spec = plan(name, args, tmp)
            if label:
                spec["overrides"] += [o for o in extra.split(",") if o]
                spec["run_dir"] += f"_{label}"
                spec["name"] = f"{name}/{label}"
                name = spec["name"]
            print(
                f"\n[{name}] data={spec['data']} seq={spec['seq'] or 'default'} batch={spec['batch']} "
                f"micro={spec['micro']} ...",
                flush=True,
            )
            started = time.perf_counter()
            res = run_child(spec, args.verbose)
            if "error" in res:
                failed += 1
                print(f"[{name}] FAILED: {res['error']}")
                continue
            row = summarize(spec, res, args.warmup)
            results.append(row)
            per_step = ", ".join(f"{r['tokens_per_s']:.0f}" for r in sorted(res["rows"], key=lambda r: r["step"]))
            print(f"[{name}] done in {time.perf_counter() - started:.0f}s; tokens/s per step: {per_step}")
    finally:
        if args.keep:
            print(f"\nrun directories kept in {tmp}")
        else:
            tmp_ctx.cleanup()
    if results:
        print()
        print(table(results))
        print(
            "\nbatch = pairs per step / per forward; tok/seq = non-pad tokens per sequence (prompt + response); "
            "peak RSS = the child process's max resident set (model load included); wall = train.run end to end."
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
