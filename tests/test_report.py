"""report.png and report.html from hand-written run dirs: what they hold, escaping, and runs
that have only part of the files (mode=eval, no generation eval, no metrics yet)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from dpo_cli.report import MAX_SAMPLE_ROWS, PANELS, build_figure, write_report, write_reports

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert(1)</script>"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort 3 1 2 & say <why>."}]
GEN_EVAL = {
    "eval_win_rate": 0.625,
    "eval_win_rate_low": 0.45,
    "eval_win_rate_high": 0.77,
    "eval_tie_rate": 0.125,
    "eval_judge_score": 0.6,
    "eval_reference_judge_score": 0.4,
    "eval_response_length": 12.5,
    "eval_reference_response_length": 20.0,
    "eval_unfinished_share": 0.25,
}


def train_row(step: int) -> dict:
    return {
        "step": step,
        "loss": 0.69 - 0.001 * step,
        "rewards/accuracies": min(1.0, 0.5 + step / 100),
        "rewards/margins": 0.01 * step,
        "rewards/chosen": 0.005 * step,
        "rewards/rejected": -0.005 * step,
        "logps/chosen": -30.0 + 0.01 * step,
        "logps/rejected": -31.0 - 0.02 * step,
        "logps/chosen_change": 0.01 * step,
        "logps/chosen_below_reference": 0.5 - step / 1000,
        "grad_norm": 1.0,
        "lr": 1e-3,
        "tokens_per_s": 5000.0,
    }


def eval_row(step: int, generation: bool = True) -> dict:
    row = {
        "step": step,
        "eval_loss": 0.68 - 0.001 * step,
        "eval_rewards/accuracies": 0.6,
        "eval_rewards/margins": 0.02 * step,
        "eval_rewards/chosen": 0.01 * step,
        "eval_rewards/rejected": -0.01 * step,
        "eval_logps/chosen": -29.0,
        "eval_logps/rejected": -33.0,
        "eval_logps/chosen_change": 0.1,
        "eval_logps/chosen_below_reference": 0.25,
    }
    return {**row, **GEN_EVAL} if generation else row


def samples_for(step: int) -> list[dict]:
    """Three prompts: markup to escape, a conversation, and a tie with the judge's verdicts."""
    common = {"step": step, "policy_tokens": 5, "reference_tokens": 9, "policy_finished": True}
    return [
        {**common, "prompt": f"Say {SCRIPT} please", "policy": f"policy says {SCRIPT} at {step}",
         "reference": "reference says hi", "policy_score": 1.0, "reference_score": 0.0, "outcome": "win",
         "reference_finished": False},
        {**common, "prompt": MESSAGES, "policy": f"1 2 3\n  (step {step})", "reference": "3 2 1 <b>bold</b>",
         "policy_score": 0.0, "reference_score": 1.0, "outcome": "loss", "reference_finished": True},
        {**common, "prompt": "tie me", "policy": f"same & same {step}", "reference": "same & same",
         "policy_score": 0.5, "reference_score": 0.5, "outcome": "tie", "reference_finished": True,
         "policy_verdict": "correct", "reference_verdict": "misordered"},
    ]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(run_dir: Path, steps: int = 8, eval_every: int = 4, sample_steps: tuple[int, ...] = (4, 8)) -> Path:
    rows = []
    for step in range(1, steps + 1):
        rows.append(train_row(step))
        if step % eval_every == 0:
            rows.append(eval_row(step))
    write_jsonl(run_dir / "metrics.jsonl", rows)
    for step in sample_steps:
        write_jsonl(run_dir / "samples" / f"step-{step}.jsonl", samples_for(step))
    # Files the report leaves alone.
    write_jsonl(run_dir / "samples" / "reference.jsonl", [{"prompt": "p", "response": "IGNORED-REFERENCE-FILE"}])
    (run_dir / "eval.json").write_text("{}")
    return run_dir


class Page(HTMLParser):
    """What a test needs from report.html: elements by id, every tag seen, the text of each
    table cell, the rows of each step table, and image sources."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: dict[str, tuple[str, dict]] = {}
        self.tags: list[str] = []
        self.cells: list[str] = []
        self.step_rows: dict[str, int] = {}  # table id -> data rows (header row excluded)
        self.images: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._table: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            assert attrs["id"] not in self.ids, f"duplicate id {attrs['id']}"
            self.ids[attrs["id"]] = (tag, attrs)
        if tag == "table":
            self._table = attrs.get("id")
            if self._table:
                self.step_rows[self._table] = -1  # the header row
        elif tag == "tr" and self._table:
            self.step_rows[self._table] += 1
        elif tag == "td":
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == PNG_SIGNATURE
    return imread(io.BytesIO(data), format="png")


def test_a_full_run_gets_both_reports(tmp_path):
    run_dir = make_run(tmp_path / "my-run")
    png_path, html_path = write_reports(run_dir)
    assert (png_path, html_path) == (run_dir / "report.png", run_dir / "report.html")
    # Written under temporary names and renamed: nothing else is left behind.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "eval.json",
        "metrics.jsonl",
        "report.html",
        "report.png",
        "samples",
    ]

    image = decode_png(png_path.read_bytes())
    height, width = image.shape[:2]
    assert width >= 1200 and height >= 600, image.shape
    assert image[..., :3].std() > 0.05  # curves, not a blank canvas

    text = html_path.read_text()
    page = Page(text)
    assert {"summary", "curves", "samples", "step-4", "step-8"} <= page.ids.keys()
    assert [k for k in page.ids if k.startswith("step-")] == ["step-8", "step-4"]  # newest first
    assert page.ids["step-8"][1]["data-step"] == "8"
    assert page.step_rows == {"step-8": 3, "step-4": 3}
    assert "my-run" in "".join(page.text)

    # Self-contained: the only source is the inline PNG, and it is the one written beside it.
    assert len(page.images) == 1
    prefix = "data:image/png;base64,"
    assert page.images[0].startswith(prefix)
    assert base64.b64decode(page.images[0][len(prefix) :]) == png_path.read_bytes()
    assert "http://" not in text and "https://" not in text
    assert "script" not in page.tags

    # Every response, escaped in the file and read back as the same text.
    for step in (4, 8):
        for sample in samples_for(step):
            assert sample["policy"] in page.cells
            assert sample["reference"] in page.cells
    assert f"Say {SCRIPT} please" in page.cells
    assert "system: Be brief.\nuser: Sort 3 1 2 &amp; say &lt;why&gt;." in text
    assert "system: Be brief.\nuser: Sort 3 1 2 & say <why>." in page.cells
    assert SCRIPT not in text and "<b>bold</b>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "IGNORED-REFERENCE-FILE" not in text

    words = "".join(page.text)
    assert "3 prompts: the policy won 1, tied 1, lost 1." in words
    assert "policy: correct" in words and "reference: misordered" in words
    assert "cut off at the token limit" in words  # the first reference did not finish
    assert "62.5%" in words and "45.0% to 77.0%" in words and "not shown better or worse" in words
    assert "eval_win_rate_high" in words and "tokens_per_s" in words  # the last eval and train rows


def test_many_samples_are_cut_to_a_readable_page(tmp_path):
    run_dir = make_run(tmp_path / "run", sample_steps=())
    rows = [{**samples_for(2)[0], "policy": f"response {i}"} for i in range(MAX_SAMPLE_ROWS + 7)]
    write_jsonl(run_dir / "samples" / "step-2.jsonl", rows)
    page = Page(write_reports(run_dir)[1].read_text())
    assert page.step_rows == {"step-2": MAX_SAMPLE_ROWS}
    assert "7 left out" in "".join(page.text)


def test_a_mode_eval_run_with_one_eval_row(tmp_path):
    run_dir = tmp_path / "eval-only"
    write_jsonl(run_dir / "metrics.jsonl", [eval_row(0)])
    write_jsonl(run_dir / "samples" / "step-0.jsonl", samples_for(0))
    png_path, html_path = write_reports(run_dir)
    decode_png(png_path.read_bytes())
    page = Page(html_path.read_text())
    assert "step-0" in page.ids
    assert "At step 0 the policy's win rate" in "".join(page.text)
    assert "last training row" not in "".join(page.text)

    # A single point shows only as a marker: every drawn series of one point has one.
    fig = build_figure([eval_row(0)], "eval-only")
    drawn = [line for ax in fig.axes for line in ax.lines if len(line.get_xdata()) == 1]
    assert len(drawn) >= 8  # loss, accuracy, margin, 2 rewards, win rate, 2 lengths, ...
    assert all(line.get_marker() not in (None, "None", "", " ") for line in drawn)


def test_panels_without_metrics_say_so(tmp_path):
    rows = [train_row(s) for s in range(1, 5)] + [eval_row(4, generation=False)]
    fig = build_figure(rows, "no-generation")
    empty = {ax.get_title() for ax in fig.axes if any(t.get_text() == "no data" for t in ax.texts)}
    assert empty == {"win rate against the reference", "response length (tokens)"}
    assert len(fig.axes) == len(PANELS)


def test_a_run_without_samples(tmp_path):
    run_dir = make_run(tmp_path / "run", sample_steps=())
    shutil.rmtree(run_dir / "samples")
    page = Page(write_reports(run_dir)[1].read_text())
    assert {"summary", "curves", "samples"} <= page.ids.keys()
    assert not [k for k in page.ids if k.startswith("step-")]
    assert "No samples" in "".join(page.text)


@pytest.mark.parametrize("metrics", [None, "", '{"step": 1, "lo'], ids=["missing", "empty", "cut-short"])
def test_a_run_without_metrics_yet(tmp_path, metrics):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text(metrics)
    png_path, html_path = write_reports(run_dir)
    decode_png(png_path.read_bytes())
    page = Page(html_path.read_text())
    assert "No metrics yet" in "".join(page.text)
    assert page.images[0].startswith("data:image/png;base64,")


def test_write_report_still_writes_the_png_alone(tmp_path):
    run_dir = make_run(tmp_path / "run")
    write_report(run_dir / "metrics.jsonl", tmp_path / "out.png")
    decode_png((tmp_path / "out.png").read_bytes())
    assert not (run_dir / "report.html").exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium)")
def test_report_html_renders_in_a_real_browser(tmp_path):
    run_dir = make_run(tmp_path / "run")
    _, html_path = write_reports(run_dir)
    shot = tmp_path / "shot.png"
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
           "--window-size=1280,2000", f"--user-data-dir={tmp_path / 'profile'}", html_path.as_uri()]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot (exit {result.returncode}):\n{result.stderr[-2000:]}"
    image = decode_png(shot.read_bytes())
    assert image.shape[:2] == (2000, 1280)
    assert image[..., :3].std() > 0.05, "the page rendered blank"
