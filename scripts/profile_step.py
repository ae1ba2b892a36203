#!/usr/bin/env python
"""Where one dpo-cli training step spends its time: a phase breakdown and torch.profiler's top ops.

Builds the same parts `dpo-train` builds (config composed with Hydra, data prepared, model,
reference, layout chosen and checked), then times one optimizer step, after one warm-up step,
phase by phase (collate, reference forward, policy forward, loss, backward, optimizer), and
profiles it with torch.profiler: CPU ops by self CPU time, and on CUDA also the top kernels by
self CUDA time. Prints figures only.

    python scripts/profile_step.py                           # SmolLM2, batch 4, length 512, HH-like data
    python scripts/profile_step.py --override train.layout=padded --override train.logits_chunk=null
    python scripts/profile_step.py --device cuda --model qwen05 --seq 2048 --batch 8 --json prof.json

On CUDA the step runs as `train.mixed_precision=bf16` does (float32 weights, bf16 autocast over the
forward passes and the loss; --dtype fp32 turns it off), and each phase's clock is read after
torch.cuda.synchronize(), so a phase's kernels count in its own time. qwen05 is bench.py's
Qwen2.5-0.5B-shaped model with random weights (written to a temporary directory by the same code).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

from bench import MODELS, cuda_sync, make_pairs, qwen05_dir, write_hh  # scripts/ is this script's sys.path[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--small", action="store_true", help="qwen05 shrunk as bench.py --dry-run's (quick checks)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the step runs")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on cuda")
    parser.add_argument("--batch", type=int, default=4, help="pairs in the step (one micro batch)")
    parser.add_argument("--seq", type=int, default=512, help="data.max_length")
    parser.add_argument("--lengths", default="hh", choices=("hh", "fixed"), help="as scripts/bench.py")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="Hydra override")
    parser.add_argument("--top", type=int, default=15, help="profiler ops (and CUDA kernels) to list")
    parser.add_argument("--json", metavar="PATH", help="also write the phases and the top ops/kernels as JSON")
    args = parser.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def compose(args: argparse.Namespace, tmp: Path):
    """The config `dpo-train` would compose for this step (with the model directory made here for qwen05)."""
    from hydra import compose, initialize_config_dir

    import dpo_cli.cli

    data_file = tmp / "hh.jsonl"
    write_hh(data_file, make_pairs(4 * args.batch, args.lengths, args.seq, seed=0))
    overrides = list(MODELS[args.model]["overrides"])
    if args.model == "qwen05":
        overrides.append(f"model.name_or_path={qwen05_dir(tmp / 'qwen05', small=args.small)}")
    overrides += [
        "data=hh",
        f"data.path={data_file}",
        "data.eval_holdout=0",
        "data.cache_dir=null",
        f"data.max_length={args.seq}",
        f"data.max_prompt_length={args.seq // 2}",
        f"train.batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        *args.override,
    ]
    dpo_cli.cli.register()
    with initialize_config_dir(config_dir=dpo_cli.cli.config_dir(), version_base="1.3"):
        return compose("config", overrides=overrides)


def top_ops(prof, key: str, n: int) -> list[dict]:
    """The `n` ops with the most self time under `key` (self_cpu_time_total or self_device_time_total), in ms."""
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in events]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    import torch
    from hydra.utils import instantiate
    from torch.profiler import ProfilerActivity, profile, record_function

    from dpo_cli import layout
    from dpo_cli.config import validate
    from dpo_cli.data.prepare import prepare
    from dpo_cli.modeling import load_model, load_tokenizer
    from dpo_cli.reference import live_reference
    from dpo_cli.scoring import REFERENCE_EXTRAS, make_batch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu")
    tmp = Path(tempfile.mkdtemp(prefix="dpo_profile."))
    cfg = validate(compose(args, tmp))  # typed, as dpo-train passes it to the parts
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.train.seed).train
    policy = load_model(cfg.model, tokenizer, cfg.train.seed).to(args.device)
    loss_fn = instantiate(cfg.loss)
    auto_attention = cfg.model.attn_implementation is None  # as training: flex_attention for packed rows on CUDA
    choice = layout.choose(cfg.train.layout, cfg.train.logits_chunk, policy, False, auto_attention)
    choice = layout.probe(choice, policy, data, tokenizer.pad_token_id, loss_fn.needs, cfg.train.micro_batch_size)
    layout.apply(choice, policy)
    # a copy of the policy, so on the policy's device
    reference = live_reference(cfg, tokenizer, policy, head=choice.head) if loss_fn.requires_reference else None
    if reference is not None and hasattr(reference, "model"):
        layout.apply(choice, reference.model)
    optimizer = instantiate(cfg.optimizer)(params=[p for p in policy.parameters() if p.requires_grad])
    policy.train()
    where = f"{args.device}" + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else "")
    print(f"{args.model} on {where}, {args.dtype}: {choice.describe()}; reference: "
          f"{reference.describe() if reference else 'none'}")  # fmt: skip

    phases: dict[str, float] = {}

    def timed(name: str, fn):
        cuda_sync()  # on CUDA: earlier phases' kernels finish before this phase's clock starts
        started = time.perf_counter()
        with record_function(name):
            out = fn()
        cuda_sync()
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - started
        return out

    def autocast():
        # as accelerate's mixed_precision=bf16: the forward passes and the loss in bf16 autocast, backward outside
        if args.dtype != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(args.device, dtype=torch.bfloat16)

    def step(indices: list[int]) -> None:
        from dpo_cli.logprobs import batch_logps

        batch = timed(
            "collate", lambda: make_batch(data, indices, tokenizer.pad_token_id, loss_fn, args.device, choice.layout)
        )
        needs = loss_fn.needs
        with autocast():
            ref = timed("reference forward", lambda: reference(batch, needs & REFERENCE_EXTRAS) if reference else None)
            fwd = timed("policy forward", lambda: batch_logps(policy, batch, needs, head=choice.head))
            out = timed("loss", lambda: loss_fn(fwd.logps, ref))
        timed("backward", lambda: out.loss.backward())
        timed("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        print(
            f"  rows {tuple(batch['input_ids'].shape)}, {int(batch['attention_mask'].sum())} tokens computed for "
            f"{int(batch['length'].sum())} sequence tokens"
        )

    step(list(range(args.batch)))  # warm-up
    phases.clear()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        started = time.perf_counter()
        step(list(range(args.batch, 2 * args.batch)))
        cuda_sync()
        total = time.perf_counter() - started
    report(prof, phases, total, args)


def report(prof, phases: dict[str, float], total: float, args: argparse.Namespace) -> None:
    """Print the phases and the top ops (and kernels); write them as JSON with --json."""
    print(f"\none step of {args.batch} pairs: {total:.3f} s")
    for name, seconds in phases.items():
        print(f"  {name:<18} {seconds:7.3f} s  {100 * seconds / total:5.1f}%")
    print(f"\ntop {args.top} ops by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    out = {"model": args.model, "device": args.device, "dtype": args.dtype, "batch": args.batch, "seq": args.seq}
    out |= {"step_seconds": total, "phases": phases, "top_cpu": top_ops(prof, "self_cpu_time_total", args.top)}
    if args.device == "cuda":
        import torch

        # Kernels run asynchronously: their self CUDA time is where the GPU's time goes, whatever the CPU waits on.
        print(f"\ntop {args.top} by self CUDA time (kernels and the ops that launch them):")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60))
        out |= {
            "device_name": torch.cuda.get_device_name(0),
            "top_cuda": top_ops(prof, "self_device_time_total", args.top),
        }
        out["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
