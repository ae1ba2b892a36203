"""Iterative (on-policy) DPO against offline DPO on the built-in task, at equal optimizer steps.

For each seed, two runs from the same warm start (model=tiny's SFT, deterministic given the seed
and the number of threads) and the same loss:
- offline: `dpo-train train.max_steps=ROUNDS*STEPS` on the built-in pairs;
- iterative: `dpo-train task=iterative iterative.rounds=ROUNDS train.max_steps=STEPS` (pairs of the
  policy's own samples, judged exactly).
Both are judged the same way at the end: EVAL_PROMPTS held-out prompts answered by the policy and
by the initial policy (the same answers in both runs), scored by the exact judge. Prints one row
per run and the mean over seeds, with the 95% Wilson interval of each win rate.

    python scripts/iterative_vs_offline.py --seeds 1 2 3 --out /tmp/ivo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

KEYS = ("eval_judge_score", "eval_reference_judge_score", "eval_win_rate", "eval_win_rate_low", "eval_win_rate_high")


def last_eval(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_win_rate" in r][-1]


def launch(run_dir: Path, args: list[str]) -> dict[str, float]:
    if not (run_dir / "final").is_dir():
        command = [sys.executable, "-m", "dpo_cli", *args, f"hydra.run.dir={run_dir}", "logger.wandb.mode=disabled",
                   "logger.progress=false", "logger.report=false"]  # fmt: skip
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return last_eval(run_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per round")
    p.add_argument("--prompts", type=int, default=1024, help="training prompts sampled per round")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    p.add_argument("--eval-prompts", type=int, default=256)
    p.add_argument("--loss", default="rpo")
    p.add_argument("--out", type=Path, default=Path("outputs/iterative_vs_offline"))
    p.add_argument("overrides", nargs="*", help="further overrides, given to both runs (e.g. scheduler.warmup_steps=4)")
    a = p.parse_args()
    common = [f"loss={a.loss}", f"eval.prompts={a.eval_prompts}", "train.eval_every=null", *a.overrides]
    table: dict[str, list[dict[str, float]]] = {"offline": [], "iterative": []}
    for seed in a.seeds:
        s = [f"train.seed={seed}", *common]
        table["offline"].append(launch(a.out / f"offline-{seed}", [*s, f"train.max_steps={a.rounds * a.steps}"]))
        table["iterative"].append(
            launch(
                a.out / f"iterative-{seed}",
                [
                    *s,
                    "task=iterative",
                    f"iterative.rounds={a.rounds}",
                    f"train.max_steps={a.steps}",
                    f"iterative.prompts={a.prompts}",
                    f"iterative.samples={a.samples}",
                ],
            )  # fmt: skip
        )
    print(f"\nloss={a.loss} {' '.join(a.overrides)}, {a.rounds * a.steps} optimizer steps each, {a.eval_prompts} held-out prompts, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    print("| run | seed | judge score | initial policy's score | win rate vs initial (95% interval) |")
    print("|---|---|---|---|---|")
    for kind, rows in table.items():
        for seed, r in zip(a.seeds, rows, strict=True):
            print(f"| {kind} | {seed} | {r['eval_judge_score']:.3f} | {r['eval_reference_judge_score']:.3f} | "
                  f"{r['eval_win_rate']:.3f} ({r['eval_win_rate_low']:.3f}-{r['eval_win_rate_high']:.3f}) |")  # fmt: skip
    for kind, rows in table.items():
        scores = [r["eval_judge_score"] for r in rows]
        wins = [r["eval_win_rate"] for r in rows]
        sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(f"| {kind} | mean of {len(rows)} | {statistics.fmean(scores):.3f} (sd {sd:.3f}) | | "
              f"{statistics.fmean(wins):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
