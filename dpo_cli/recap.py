"""The one-screen summary printed at the end of a run (and of mode=eval): the final metrics, the
win rate, and where the model, the report and the samples are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (label, metric name, format) for the train and held-out lines; absent metrics are left out
# (a DPO run logs rewards/*, a reward model accuracy and margin).
PREFERENCE = (
    ("loss", "loss", "{:.4f}"),
    ("reward accuracy", "rewards/accuracies", "{:.3f}"),
    ("margin", "rewards/margins", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),  # a reward model's (task=reward): its chosen score higher
    ("margin", "margin", "{:.3f}"),  # a reward model's: mean chosen - rejected score
    ("chosen reward", "rewards/chosen", "{:.3f}"),
    ("rejected reward", "rewards/rejected", "{:.3f}"),
    ("chosen log-prob change", "logps/chosen_change", "{:+.2f}"),
    ("chosen below reference", "logps/chosen_below_reference", "{:.0%}"),
)


def _line(row: dict[str, Any], prefix: str) -> str:
    parts = [f"{label} {fmt.format(row[prefix + key])}" for label, key, fmt in PREFERENCE if prefix + key in row]
    return " | ".join(parts)


def generation_line(row: dict[str, Any], generation: Any) -> str | None:
    """'win rate 0.73 (95% interval 0.64-0.81) against the reference over 64 prompts ...'."""
    if "eval_win_rate" not in row or generation is None:
        return None
    s = generation.settings
    return (
        f"win rate {row['eval_win_rate']:.3f} ({s.confidence:.0%} interval {row['eval_win_rate_low']:.3f}-"
        f"{row['eval_win_rate_high']:.3f}) against the reference over {len(generation.prompts)} prompts, ties "
        f"{row['eval_tie_rate']:.0%}; judge: {generation.judge.describe()}; score {row['eval_judge_score']:.3f} "
        f"(reference {row['eval_reference_judge_score']:.3f}); response length {row['eval_response_length']:.1f} "
        f"tokens (reference {row['eval_reference_response_length']:.1f}), unfinished {row['eval_unfinished_share']:.0%}"
    )


def harness_line(row: dict[str, Any]) -> str | None:
    """'sort_choice acc 0.650 (reference 0.400) | ...': lm-evaluation-harness metrics, stderr left out."""
    keys = [k for k in row if k.startswith("harness/") and not k.endswith("_stderr")]
    parts = []
    for key in keys:
        name = key.removeprefix("harness/").replace("/", " ", 1)
        ref = row.get("harness_ref/" + key.removeprefix("harness/"))
        parts.append(f"{name} {row[key]:.3f}" + (f" (reference {ref:.3f})" if ref is not None else ""))
    return " | ".join(parts) or None


def summary(
    run_dir: Path,
    last: dict[str, Any],
    steps: int | None,
    generation: Any,
    model_dir: Path | None = None,
    report: bool = True,
) -> str:
    """The summary block: `last` holds the last train and eval rows' metrics."""
    head = f"done: {steps} optimizer steps" if steps is not None else "done: evaluation"
    lines = [f"{head}; run directory {run_dir}"]
    train = _line(last, "")
    if train and steps:
        lines.append(f"  train (last logged steps)  {train}")
    held_out = _line(last, "eval_")
    if held_out:
        lines.append(f"  held-out pairs             {held_out}")
    gen = generation_line(last, generation)
    if gen:
        lines.append(f"  generations                {gen}")
    benchmarks = harness_line(last)
    if benchmarks:
        lines.append(f"  benchmarks                 {benchmarks}")
    lines.append(f"  model                      {model_dir or run_dir / 'final'}")
    drawn = f"{run_dir / 'report.html'} (curves and samples), {run_dir / 'report.png'}"
    lines.append(f"  report                     {drawn if report else 'not drawn (logger.report=false)'}")
    samples = sorted((run_dir / "samples").glob("step-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    metrics = f"{run_dir / 'metrics.jsonl'}" + (f"; samples {samples[-1]}" if samples else "")
    lines.append(f"  metrics                    {metrics}")
    return "\n".join(lines)
