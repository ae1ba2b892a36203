#!/usr/bin/env python
"""Where one dpo-cli training step spends its time: a phase breakdown and torch.profiler's top ops.

Builds the same parts `dpo-train` builds (config composed with Hydra, data prepared, model,
reference, layout chosen and checked), then times one optimizer step, after one warm-up step,
phase by phase (collate, reference forward, policy forward, loss, backward, optimizer), and
profiles it with torch.profiler (CPU). Prints figures only.

    python scripts/profile_step.py                           # SmolLM2, batch 4, length 512, HH-like data
    python scripts/profile_step.py --override train.layout=padded --override train.logits_chunk=null
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import MODELS, make_pairs, write_hh  # scripts/ is this script's sys.path[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=4, help="pairs in the step (one micro batch)")
    parser.add_argument("--seq", type=int, default=512, help="data.max_length")
    parser.add_argument("--lengths", default="hh", choices=("hh", "fixed"), help="as scripts/bench.py")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="Hydra override")
    parser.add_argument("--top", type=int, default=15, help="profiler ops to list")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from torch.profiler import ProfilerActivity, profile, record_function

    import dpo_cli.cli
    from dpo_cli import layout
    from dpo_cli.data.prepare import prepare
    from dpo_cli.modeling import load_model, load_tokenizer
    from dpo_cli.reference import live_reference
    from dpo_cli.scoring import REFERENCE_EXTRAS, make_batch

    tmp = Path(tempfile.mkdtemp(prefix="dpo_profile."))
    data_file = tmp / "hh.jsonl"
    write_hh(data_file, make_pairs(4 * args.batch, args.lengths, args.seq, seed=0))
    dpo_cli.cli.register()
    overrides = list(MODELS[args.model]["overrides"]) + [
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
    with initialize_config_dir(config_dir=dpo_cli.cli.config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.train.seed).train
    policy = load_model(cfg.model, tokenizer, cfg.train.seed)
    loss_fn = instantiate(cfg.loss)
    choice = layout.choose(cfg.train.layout, cfg.train.logits_chunk, policy, sharded=False)
    choice = layout.probe(choice, policy, data, tokenizer.pad_token_id, loss_fn.needs, cfg.train.micro_batch_size)
    reference = live_reference(cfg, tokenizer, policy, head=choice.head) if loss_fn.requires_reference else None
    optimizer = instantiate(cfg.optimizer)(params=[p for p in policy.parameters() if p.requires_grad])
    policy.train()
    print(f"{args.model}: {choice.describe()}; reference: {reference.describe() if reference else 'none'}")

    phases: dict[str, float] = {}

    def timed(name: str, fn):
        started = time.perf_counter()
        with record_function(name):
            out = fn()
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - started
        return out

    def step(indices: list[int]) -> None:
        batch = timed(
            "collate", lambda: make_batch(data, indices, tokenizer.pad_token_id, loss_fn, "cpu", choice.layout)
        )
        needs = loss_fn.needs
        ref = timed("reference forward", lambda: reference(batch, needs & REFERENCE_EXTRAS) if reference else None)

        def policy_forward():
            from dpo_cli.logprobs import batch_logps

            return batch_logps(policy, batch, needs, head=choice.head)

        fwd = timed("policy forward", policy_forward)
        out = timed("loss", lambda: loss_fn(fwd.logps, ref))
        timed("backward", lambda: out.loss.backward())
        timed("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        print(
            f"  rows {tuple(batch['input_ids'].shape)}, {int(batch['attention_mask'].sum())} tokens computed for "
            f"{int(batch['length'].sum())} sequence tokens"
        )

    step(list(range(args.batch)))  # warm-up
    phases.clear()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        started = time.perf_counter()
        step(list(range(args.batch, 2 * args.batch)))
        total = time.perf_counter() - started
    print(f"\none step of {args.batch} pairs: {total:.2f} s")
    for name, seconds in phases.items():
        print(f"  {name:<18} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
    print(f"\ntop {args.top} ops by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
