#!/usr/bin/env python
"""The LM head alone: full logits vs dpo-cli's chunked head, its GEMM in float32 or bf16.

    python scripts/bench_head.py                                  # CUDA if present, Qwen2.5-0.5B's head
    python scripts/bench_head.py --device cpu --positions 2048 --vocab 49152 --hidden 576
    python scripts/bench_head.py --json head.json

One forward and backward of the log-probs of `--positions` scored tokens through a (vocab x
hidden) head whose weight is float32 (the master weight under mixed precision), three ways:

- full logits: the (positions x vocab) logits under bf16 autocast, then float32 log-softmax and
  gather (what a model's own forward and a plain trainer do);
- chunked, float32 GEMM: dpo_cli.lmhead.chunked_logps without autocast;
- chunked, bf16 GEMM: the same under bf16 autocast (a training step's case with
  train.mixed_precision=bf16): the chunk GEMM on tensor cores, log-softmax and gather in float32.

Prints per way: milliseconds per pass and per chunk (median of --repeat after 2 warm-ups, CUDA
synchronised), peak memory above the inputs (CUDA only), and the largest difference from float64
log-probs. Figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dpo_cli.lmhead import chunked_logps  # noqa: E402 - the repository's package, without installing it


def full_logps(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = (h @ w.t()).float()
    return torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)


def timed(fn, device: torch.device, repeat: int) -> tuple[float, int | None]:
    """Median seconds of `fn()` and its peak memory above what was allocated before (CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen2.5's vocabulary by default")
    parser.add_argument("--hidden", type=int, default=896, help="Qwen2.5-0.5B's hidden size by default")
    parser.add_argument("--positions", type=int, default=16384, help="scored tokens in the pass (8 pairs x 2048)")
    parser.add_argument("--chunk", type=int, default=1024, help="train.logits_chunk")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    name = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    device = torch.device(name)

    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(args.positions, args.hidden, device=device, generator=g)
    w = (torch.randn(args.vocab, args.hidden, device=device, generator=g) * 0.02).requires_grad_()
    h.requires_grad_()
    target = torch.randint(0, args.vocab, (args.positions,), device=device, generator=g)
    exact = full_logps(h.detach().double(), w.detach().double(), target)
    upstream = torch.randn(args.positions, device=device, generator=g)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    ways = {
        "full logits (bf16 GEMM)": (lambda: full_logps(h, w, target), True),
        "chunked, float32 GEMM": (lambda: chunked_logps(h, w, None, target, args.chunk), False),
        "chunked, bf16 GEMM": (lambda: chunked_logps(h, w, None, target, args.chunk), True),
    }
    chunks = -(-args.positions // args.chunk)
    rows = []
    for label, (logps, autocast) in ways.items():

        def step(logps=logps, autocast=autocast):
            h.grad = w.grad = None
            with bf16 if autocast else torch.autocast(device.type, enabled=False):
                out = logps()
            (out * upstream).sum().backward()
            return out

        seconds, peak = timed(step, device, args.repeat)
        with torch.no_grad(), bf16 if autocast else torch.autocast(device.type, enabled=False):
            error = float((logps().double() - exact).abs().max())
        per_chunk = seconds / chunks if label.startswith("chunked") else None
        rows.append({"way": label, "ms": seconds * 1e3, "ms_per_chunk": per_chunk and per_chunk * 1e3,
                     "peak_mib": peak and peak / 2**20, "max_error_vs_float64": error})  # fmt: skip

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"LM head: {args.positions} positions x vocab {args.vocab} x hidden {args.hidden}, chunk {args.chunk}, "
          f"on {device_name}; forward + backward")  # fmt: skip
    print(f"{'way':<26} {'ms':>9} {'ms/chunk':>9} {'peak MiB':>9} {'max |err| vs f64':>17}")
    for r in rows:
        per_chunk = f"{r['ms_per_chunk']:.2f}" if r["ms_per_chunk"] else "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        print(f"{r['way']:<26} {r['ms']:>9.1f} {per_chunk:>9} {peak:>9} {r['max_error_vs_float64']:>17.2e}")
    if args.json:
        settings = {k: getattr(args, k) for k in ("vocab", "hidden", "positions", "chunk", "repeat")}
        Path(args.json).write_text(json.dumps({"device": device_name, **settings, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
