"""report.png: training and evaluation curves from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin"),
    ("rewards/chosen", "chosen / rejected reward"),
)


def write_report(metrics_path: Path, out_path: Path) -> None:
    """Plot each PANELS metric against the step, train rows and `eval_` rows together.

    Uses matplotlib's object API (no pyplot), so no global backend state changes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, title) in zip(fig.subplots(2, 2).flat, PANELS, strict=True):
        series = [(key, "train"), ("eval_" + key, "eval")]
        if key == "rewards/chosen":
            series = [
                (k, f"{split} {side}")
                for side in ("chosen", "rejected")
                for k, split in ((f"rewards/{side}", "train"), (f"eval_rewards/{side}", "eval"))
            ]
        for name, label in series:
            points = [(r["step"], r[name]) for r in rows if name in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if label.startswith("eval") else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:  # unpaired data (KTO) logs no reward accuracy: an empty panel, no legend
            ax.legend(fontsize=8)
    fig.suptitle(metrics_path.parent.name)
    fig.savefig(out_path, dpi=100)
