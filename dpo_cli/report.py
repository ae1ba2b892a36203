"""report.png and report.html: a run's curves, its latest numbers and its generated samples.

report.png plots metrics.jsonl against the step. report.html is one self-contained file (the
PNG inline as a data: URI, CSS inline, no scripts, nothing fetched) with a summary of the last
train and eval rows, the curves, and samples/step-N.jsonl as tables of prompt, policy
response and reference response. Both may be redrawn while the run trains, so each is written
under a temporary name and renamed: a reader never sees half a file. Both read what is there;
a run without metrics or samples yet gets a report that says so rather than an error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Any

# (title, [(metrics key, legend label), ...]). Any key may be missing: generation eval is
# optional, reference-free losses log no chosen_change, unpaired data (KTO) no accuracies;
# a reward model (task=reward) logs accuracy and margin.
PANELS = (
    ("loss", [("loss", "train"), ("eval_loss", "eval")]),
    (
        "reward accuracy",
        [
            ("rewards/accuracies", "train"),
            ("eval_rewards/accuracies", "eval"),
            ("accuracy", "train"),
            ("eval_accuracy", "eval"),
        ],
    ),
    (
        "reward margin",
        [("rewards/margins", "train"), ("eval_rewards/margins", "eval"), ("margin", "train"), ("eval_margin", "eval")],
    ),
    (
        "chosen / rejected reward",
        [
            ("rewards/chosen", "train chosen"),
            ("eval_rewards/chosen", "eval chosen"),
            ("rewards/rejected", "train rejected"),
            ("eval_rewards/rejected", "eval rejected"),
        ],
    ),
    ("win rate against the reference", [("eval_win_rate", "policy")]),
    ("response length (tokens)", [("eval_response_length", "policy"), ("eval_reference_response_length", "reference")]),
    (
        "log-prob of the chosen response",
        [
            ("logps/chosen", "train chosen"),
            ("eval_logps/chosen", "eval chosen"),
            ("eval_logps/rejected", "eval rejected"),
        ],
    ),
    (
        "share of pairs: chosen log-prob below the reference's",
        [("logps/chosen_below_reference", "train"), ("eval_logps/chosen_below_reference", "eval")],
    ),
)
# The last train row's metrics worth a line in the summary (the eval row is shown whole).
TRAIN_SUMMARY = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "accuracy",
    "margin",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/chosen_change",
    "logps/chosen_below_reference",
    "grad_norm",
    "lr",
    "tokens_per_s",
)
MAX_SAMPLE_ROWS = 50  # per step: a page that stays quick to open with hundreds of eval prompts
_STEP_FILE = re.compile(r"^step-(\d+)\.jsonl$")


def write_reports(run_dir: Path) -> tuple[Path, Path]:
    """Write run_dir/report.png and run_dir/report.html from what the run dir holds now;
    returns their paths. The figure is drawn once and used by both."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    png = render_png(rows, run_dir.name)
    png_path, html_path = run_dir / "report.png", run_dir / "report.html"
    _write_atomic(png_path, png)
    _write_atomic(html_path, render_html(run_dir, rows, png).encode())
    return png_path, html_path


def write_report(metrics_path: Path, out_path: Path) -> None:
    """report.png alone: every PANELS metric against the step."""
    _write_atomic(out_path, render_png(read_jsonl(metrics_path), metrics_path.parent.name))


def write_html(run_dir: Path, out_path: Path) -> None:
    """report.html alone (the curves drawn in memory)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    _write_atomic(out_path, render_html(run_dir, rows, render_png(rows, run_dir.name)).encode())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a .jsonl file; none when it does not exist. A line that does not parse is
    skipped: the file may be read while a row is being written, or after a crash cut one."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _write_atomic(path: Path, data: bytes) -> None:
    # The pid keeps two writers (a redraw during training and a manual one) off each other's file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written temporary left beside the report
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# report.png


def render_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """The PANELS grid as PNG bytes."""
    buf = io.BytesIO()
    build_figure(rows, title).savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def build_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """The PANELS grid, 2 x 4; a panel whose metrics the run did not log says "no data". Uses
    matplotlib's object API (no pyplot), so no global backend state changes and nothing is
    kept alive between calls."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(18, 8), layout="constrained")
    FigureCanvasAgg(fig)
    steps = sorted({r["step"] for r in rows if "step" in r})
    for ax, (panel_title, series) in zip(fig.subplots(2, 4).flat, PANELS, strict=True):
        for key, label in series:
            xs, ys = _points(rows, key)
            # Eval rows are few (one in a mode=eval run): a line through one point draws nothing.
            marker = "o" if key.startswith("eval_") or len(xs) == 1 else None
            if xs:
                ax.plot(xs, ys, marker=marker, markersize=3, label=label)
        if series[0][0] == "eval_win_rate":
            _win_rate_extras(ax, rows)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        if len(steps) == 1:  # one eval (mode=eval): a unit-wide axis, not ticks at step 0.015
            ax.set_xlim(steps[0] - 1, steps[0] + 1)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=14)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title)
    return fig


def _points(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def _win_rate_extras(ax: Any, rows: list[dict[str, Any]]) -> None:
    """The confidence interval as a band (as error bars when there is a single eval, which a
    band cannot show) and the 0.5 line where the policy is no better than the reference."""
    keys = ("eval_win_rate", "eval_win_rate_low", "eval_win_rate_high")
    band = [(r["step"], r[keys[0]], r[keys[1]], r[keys[2]]) for r in rows if all(k in r for k in keys)]
    if not band:
        return
    steps, rate, low, high = (list(c) for c in zip(*band, strict=True))
    if len(band) == 1:
        ax.errorbar(steps, rate, yerr=[[rate[0] - low[0]], [high[0] - rate[0]]], fmt="none", capsize=4, alpha=0.6)
    ax.fill_between(steps, low, high, alpha=0.25, label="confidence interval")
    ax.axhline(0.5, linestyle="--", color="0.4", linewidth=1, label="even with the reference")
    ax.set_ylim(0, 1)


# ---------------------------------------------------------------------------------------------
# report.html

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.5em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.samples { table-layout: fixed; width: 100%; }
table.samples td.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: monospace; font-size: 0.85em; }
tr.win { background: #eaf7ea; } tr.loss { background: #fbeaea; } tr.tie { background: #f3f3f3; }
img { max-width: 100%; }
.note { color: #666; }
div.tables { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
"""


def render_html(run_dir: Path, rows: list[dict[str, Any]], png: bytes) -> str:
    """The page: summary, curves (the PNG inline) and samples. All text from the run (metric
    names, prompts, responses) is escaped, so a response that contains markup shows as text."""
    name = html.escape(run_dir.name)
    image = base64.b64encode(png).decode("ascii")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>report: {name}</title>",
            f"<style>{_CSS}</style>",
            "</head><body>",
            f"<h1>{name}</h1>",
            '<nav><a href="#summary">summary</a><a href="#curves">curves</a><a href="#samples">samples</a></nav>',
            '<section id="summary"><h2>summary</h2>',
            _summary(rows),
            "</section>",
            '<section id="curves"><h2>curves</h2>',
            f'<img alt="training and evaluation curves" src="data:image/png;base64,{image}">',
            "</section>",
            '<section id="samples"><h2>samples</h2>',
            _samples(run_dir / "samples"),
            "</section>",
            "</body></html>",
            "",
        ]
    )


def _summary(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="note">No metrics yet: metrics.jsonl is missing or empty.</p>'
    parts = [f"<p>{html.escape(_win_rate_words(rows))}</p>", '<div class="tables">']
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    trains = [r for r in rows if any(k in r for k in TRAIN_SUMMARY)]
    if evals:
        last = evals[-1]
        items = [(k, v) for k, v in last.items() if k != "step"]
        parts.append(_table(f"last evaluation (step {last.get('step', '?')})", items))
    if trains:
        last = trains[-1]
        items = [(k, last[k]) for k in TRAIN_SUMMARY if k in last]
        parts.append(_table(f"last training row (step {last.get('step', '?')})", items))
    benchmarks = harness_rows(rows)
    if benchmarks:
        parts.append(_harness_table(benchmarks))
    return "\n".join([*parts, "</div>"])


HARNESS, HARNESS_REF = "harness/", "harness_ref/"  # dpo_cli.harness's metric prefixes: policy, reference


def harness_rows(rows: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """(task/metric, policy value, reference value or None) from the last row holding
    lm-evaluation-harness metrics; standard errors are left out (results.json has them)."""
    found = [r for r in rows if any(str(k).startswith(HARNESS) for k in r)]
    if not found:
        return []
    last = found[-1]
    keys = [k[len(HARNESS) :] for k in last if k.startswith(HARNESS) and not k.endswith("_stderr")]
    return [(k, last[HARNESS + k], last.get(HARNESS_REF + k)) for k in keys]


def _harness_table(items: list[tuple[str, Any, Any]]) -> str:
    reference = any(ref is not None for _, _, ref in items)
    head = "<tr><th>task/metric</th><th>policy</th>" + ("<th>reference</th>" if reference else "") + "</tr>"
    body = "".join(
        f'<tr><th>{html.escape(k)}</th><td class="num">{html.escape(_number(v))}</td>'
        + (f'<td class="num">{html.escape(_number(ref)) if ref is not None else ""}</td>' if reference else "")
        + "</tr>"
        for k, v, ref in items
    )
    return f"<table><caption>benchmarks (lm-evaluation-harness)</caption>{head}{body}</table>"


def _win_rate_words(rows: list[dict[str, Any]]) -> str:
    gen = [r for r in rows if "eval_win_rate" in r]
    if not gen:
        return "No generation evaluation in this run: no win rate against the reference."
    r = gen[-1]
    text = f"At step {r.get('step', '?')} the policy's win rate against the reference is {r['eval_win_rate']:.1%}"
    text += " (ties count half)"
    if "eval_win_rate_low" in r and "eval_win_rate_high" in r:
        low, high = r["eval_win_rate_low"], r["eval_win_rate_high"]
        text += f", with a confidence interval from {low:.1%} to {high:.1%}"
        if low > 0.5:
            text += ": the policy is better than the reference"
        elif high < 0.5:
            text += ": the policy is worse than the reference"
        else:
            text += ": the interval holds 50%, so the policy is not shown better or worse than the reference"
    if "eval_tie_rate" in r:
        text += f". Ties: {r['eval_tie_rate']:.1%}"
    return text + "."


def _table(caption: str, items: list[tuple[str, Any]]) -> str:
    body = "".join(
        f'<tr><th>{html.escape(k)}</th><td class="num">{html.escape(_number(v))}</td></tr>' for k, v in items
    )
    return f"<table><caption>{html.escape(caption)}</caption>{body}</table>"


def _number(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _samples(samples_dir: Path) -> str:
    steps = []
    if samples_dir.is_dir():
        for path in samples_dir.iterdir():
            m = _STEP_FILE.match(path.name)
            if m:
                steps.append((int(m.group(1)), path))
    if not steps:
        return '<p class="note">No samples: generation evaluation has not run (samples/step-N.jsonl).</p>'
    # Newest first: the latest policy is the one a reader opens the report to see.
    return "\n".join(_step_table(step, read_jsonl(path)) for step, path in sorted(steps, reverse=True))


def _step_table(step: int, samples: list[dict[str, Any]]) -> str:
    n = {o: sum(s.get("outcome") == o for s in samples) for o in ("win", "tie", "loss")}
    parts = [
        f"<h3>step {step}</h3>",
        f"<p>{len(samples)} prompts: the policy won {n['win']}, tied {n['tie']}, lost {n['loss']}.</p>",
    ]
    shown = samples[:MAX_SAMPLE_ROWS]
    if len(samples) > len(shown):
        parts.append(
            f'<p class="note">Showing the first {len(shown)}; {len(samples) - len(shown)} left out '
            f"(all of them are in samples/step-{step}.jsonl).</p>"
        )
    head = (
        '<colgroup><col style="width:22%"><col style="width:30%"><col style="width:30%">'
        '<col style="width:10%"><col style="width:8%"></colgroup>'
        "<tr><th>prompt</th><th>policy response</th><th>reference response</th><th>scores</th><th>outcome</th></tr>"
    )
    body = "".join(_sample_row(s) for s in shown)
    parts.append(f'<table class="samples" id="step-{step}" data-step="{step}">{head}{body}</table>')
    return "\n".join(parts)


def _sample_row(s: dict[str, Any]) -> str:
    e = html.escape
    outcome = str(s.get("outcome", ""))
    scores, verdicts = [], []
    for side in ("policy", "reference"):
        line = f"{side}: {_number(s.get(f'{side}_score', '?'))}"
        if f"{side}_tokens" in s:
            cut = "" if s.get(f"{side}_finished", True) else ", cut off at the token limit"
            line += f" ({s[f'{side}_tokens']} tokens{cut})"
        scores.append(e(line))
        if s.get(f"{side}_verdict") is not None:
            verdicts.append(e(f"{side}: {s[f'{side}_verdict']}"))
    return (
        f'<tr class="{e(outcome)}">'
        f'<td class="text">{e(_prompt_text(s.get("prompt", "")))}</td>'
        f'<td class="text">{e(str(s.get("policy", "")))}</td>'
        f'<td class="text">{e(str(s.get("reference", "")))}</td>'
        f"<td>{'<br>'.join(scores)}</td><td>{'<br>'.join([e(outcome), *verdicts])}</td></tr>"
    )


def _prompt_text(prompt: Any) -> str:
    """A string as it is; a conversation as one "role: content" line per message."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)
    return json.dumps(prompt)
