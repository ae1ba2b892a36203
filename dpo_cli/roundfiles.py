"""The rounds/ directory of a task=iterative run: what each round saved, read back on resume.

    rounds/plan.json           the settings the rounds' samples depend on (a resume compares them)
    rounds/eval.jsonl          the held-out pairs, as every round's training run evaluates on
    rounds/0/model/            the initial policy (a random init or a warm start made in memory)
    rounds/N/samples.jsonl     k responses per prompt from the round's starting policy
    rounds/N/scores.jsonl      the judge's score of each (and why, for the exact judge)
    rounds/N/pairs.jsonl       the preference pairs made of them: the round's training data
    rounds/N/...               the round's training run (checkpoints/, final/, metrics.jsonl, .hydra/)
    rounds/N/trained.json      written once the round's training run has finished
    rounds/N/done.json         the round's statistics and evaluation: the round is complete
    rounds/pending             rounds remain for a next job (iterative.rounds_per_job)

Every file is written whole (a temporary file renamed into place), so a run killed at any point
finds each one complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

ROUNDS = "rounds"
PLAN, EVAL_PAIRS, PENDING = "plan.json", "eval.jsonl", "pending"
SAMPLES, SCORES, PAIRS = "samples.jsonl", "scores.jsonl", "pairs.jsonl"
TRAINED, DONE = "trained.json", "done.json"
INITIAL = Path("0") / "model"


def round_dir(run_dir: Path, n: int) -> Path:
    return run_dir / ROUNDS / str(n)


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=1) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_text(path: Path, text: str) -> None:
    """`text` into `path`, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plan_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What differs between the plan the saved rounds were made with and this run's."""
    if saved is None:
        return []
    return [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
    ]


def final_model(run_dir: Path, n: int) -> Path:
    """The full model round `n` ended with: its final/, or final/merged/ under LoRA."""
    final = round_dir(run_dir, n) / "final"
    return final / "merged" if (final / "merged").is_dir() else final


def trained_steps(run_dir: Path, upto: int) -> int:
    """Optimizer steps of rounds 1..upto-1 (all trained): the offset of round `upto`'s steps."""
    return sum(read_json(round_dir(run_dir, n) / TRAINED)["steps"] for n in range(1, upto))


def compose_metrics(run_dir: Path, rounds: int) -> list[dict[str, Any]]:
    """The run's metrics.jsonl, made from its complete rounds: each round's statistics row at
    the step it starts from, its training run's rows on the run's step count (steps of earlier
    rounds added, `round` added), and its evaluation against the initial policy at its end.
    Rebuilt whole after every round, so that a resumed run never holds a row twice."""
    rows: list[dict[str, Any]] = []
    offset = 0
    for n in range(1, rounds + 1):
        done = read_json(round_dir(run_dir, n) / DONE)
        if done is None:
            break
        rows.append({"step": offset, "round": n, **done["stats"]})
        for row in read_jsonl(round_dir(run_dir, n) / "metrics.jsonl") or []:
            rows.append({**row, "step": row["step"] + offset, "round": n})
        offset += done["steps"]
        if done.get("eval"):
            rows.append({"step": offset, "round": n, **done["eval"]})
    write_jsonl(run_dir / "metrics.jsonl", rows)
    return rows


def link_final(run_dir: Path, n: int) -> Path:
    """run_dir/final/ as round `n`'s final/: its files hard-linked (copied where links cannot
    be made), whole or not at all."""
    source, target = round_dir(run_dir, n) / "final", run_dir / "final"
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, tmp, copy_function=link)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
