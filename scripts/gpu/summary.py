#!/usr/bin/env python
"""The verdict of scripts/gpu/check.sh: summary.json and summary.md from what its stages left.

    python scripts/gpu/summary.py --work WORK --out OUT --device cuda [--dry-run]

check.sh runs each stage and writes one line per stage to WORK/stages.tsv (name, exit code or
`skipped`, seconds, timeout, command or reason); each stage's output is WORK/<name>.log, and the
stages with a helper leave WORK/<name>.json (env_probe.py, resume_check.py). Here each stage's
status (pass, fail, skipped), reason and key figures are read off those, then written to
OUT/summary.json and OUT/summary.md (with bench.json's rows, whatever its layout). Exit 0 when no
stage failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

TIMED_OUT = (124, 137)  # timeout(1): the stage ran past its limit (137: killed after the grace period)


def tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def last_line(log: Path, pattern: str = r"\S") -> str:
    lines = [ln.strip() for ln in tail(log, 200).splitlines() if re.search(pattern, ln)]
    return lines[-1][:300] if lines else "no output"


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {"value": data}
    except (OSError, ValueError):
        return {}


def judge_env(rc: int, log: Path, data: dict) -> tuple[str, str, dict]:
    dev = data.get("device", {})
    figures = {"device": dev.get("name"), "cuda": dev.get("cuda_available"), **data.get("versions", {})}
    if rc != 0:
        errors = data.get("import_errors") or {"env_probe.py": last_line(log)}
        return "fail", "; ".join(f"{k}: {v}" for k, v in errors.items()), figures
    unmet = data.get("unmet_requirements", [])
    reason = f"{dev.get('name')}, torch {figures.get('torch')}" + (
        f"; carried wheels' unmet requirements: {'; '.join(unmet)}" if unmet else ""
    )
    return "pass", reason, figures


def judge_gpu_tests(rc: int, log: Path, data: dict) -> tuple[str, str, dict]:
    counts = {k: 0 for k in ("passed", "failed", "errors", "skipped", "deselected")}
    summary = last_line(log, r"(passed|failed|skipped|deselected|error|no tests ran)")
    for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary):
        counts["errors" if word.startswith("error") else word] = int(n)
    if rc == 0 and counts["passed"]:
        return "pass", f"{counts['passed']} gpu tests passed ({counts['skipped']} skipped)", counts
    if rc == 0 and counts["skipped"]:
        return "skipped", f"all {counts['skipped']} gpu tests skipped (no CUDA)", counts
    if rc == 5:  # pytest: no tests collected
        return "skipped", "no test carries the gpu mark yet", counts
    return "fail", f"pytest exited {rc}: {summary}", counts


def judge_bench(rc: int, log: Path, data: dict) -> tuple[str, str, dict]:
    figures = {"bench_json": bool(data)}
    text = tail(log, 200)
    if rc == 0:
        return "pass", "bench.json written" if data else "ran; it wrote no bench.json", figures
    if m := re.search(r"unrecognized arguments: (.*)", text):
        return "fail", f"scripts/bench.py does not take these arguments (yet): {m.group(1).strip()}", figures
    return "fail", f"exited {rc}: {last_line(log)}", figures


def judge_run_check(rc: int, log: Path, data: dict) -> tuple[str, str, dict]:
    keys = ("exact", "max_row_diff", "max_weight_diff", "run_to_run_row_diff", "run_to_run_weight_diff", "rows")
    figures = {k: data[k] for k in keys if k in data}
    if not data:
        return "fail", f"exited {rc} without a result: {last_line(log)}", figures
    return data.get("status", "fail"), data.get("reason", "no reason given"), figures


def judge_measured(rc: int, log: Path, data: dict) -> tuple[str, str, dict]:
    """A figures-only stage (head, profile): it passes when it ran and wrote its JSON."""
    if rc == 0 and data:
        return "pass", "figures below", {}
    return "fail", f"exited {rc}{'' if data else ' without its JSON'}: {last_line(log)}", {}


JUDGES = {
    "env": judge_env,
    "gpu_tests": judge_gpu_tests,
    "head": judge_measured,
    "profile": judge_measured,
    "compile": judge_measured,
    "bench": judge_bench,
    "resume": judge_run_check,
    "fsdp": judge_run_check,
}


def stages(work: Path, out: Path) -> list[dict]:
    result = []
    for line in (work / "stages.tsv").read_text().splitlines():
        name, code, seconds, timeout, detail = line.split("\t", 4)
        stage = {"name": name, "seconds": float(seconds), "timeout_s": int(timeout)}
        if code == "skipped":
            result.append({**stage, "status": "skipped", "reason": detail, "figures": {}})
            continue
        rc, log = int(code), work / f"{name}.log"
        data = read_json(out / "bench.json" if name == "bench" else work / f"{name}.json")
        if rc in TIMED_OUT:
            status, reason, figures = "fail", f"timed out after {timeout} s: {last_line(log)}", {}
        else:
            status, reason, figures = JUDGES[name](rc, log, data)
        stage.update(status=status, reason=reason, figures=figures, command=detail, exit_code=rc)
        if status == "fail":
            stage["log_tail"] = tail(log)
        result.append(stage)
    return result


def git_commit(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], columns: list[str] | None = None) -> list[str]:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]


def bench_section(bench: dict) -> list[str]:
    """bench.json's headline, whatever its layout: the first list of row dicts found (at the top
    or one level down) as a table, the top level's plain values as a list."""
    if not bench:
        return ["No bench.json (see the bench stage)."]
    lines = ["From [bench.json](bench.json):", ""]
    scalars = {k: v for k, v in bench.items() if isinstance(v, (str, int, float, bool)) or v is None}
    lines += [f"- {k}: {cell(v)}" for k, v in scalars.items()]
    candidates = [bench.get("value")] + list(bench.values())
    candidates += [v for d in bench.values() if isinstance(d, dict) for v in d.values()]
    rows = next((c for c in candidates if isinstance(c, list) and c and all(isinstance(r, dict) for r in c)), None)
    if rows:
        plain = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows]
        columns = list(dict.fromkeys(k for r in plain for k in r))[:12]
        lines += ["", *table(plain, columns)]
    return lines


def head_section(head: dict) -> list[str]:
    if not head:
        return ["No figures (see the head stage)."]
    shape = f"{head['positions']} positions x vocab {head['vocab']} x hidden {head['hidden']}, chunk {head['chunk']}"
    return [f"{shape}, on {head['device']}; one forward and backward:", "", *table(head["rows"])]


def profile_section(profile: dict) -> list[str]:
    if not profile:
        return ["No figures (see the profile stage)."]
    step = profile["step_seconds"]
    lines = [f"One step of {profile['batch']} pairs at {profile['seq']} tokens ({profile['dtype']}): {step:.3f} s", ""]
    lines += table(
        [{"phase": k, "seconds": v, "share": f"{100 * v / step:.1f}%"} for k, v in profile["phases"].items()]
    )
    kernels = profile.get("top_cuda") or profile.get("top_cpu") or []
    which = "CUDA kernels and ops by self CUDA time" if profile.get("top_cuda") else "ops by self CPU time"
    return [*lines, "", f"Top {which}:", "", *table(kernels)]


def markdown(summary: dict, bench: dict) -> str:
    lines = [
        f"# GPU check: {'PASS' if summary['passed'] else 'FAIL'}",
        "",
        f"{summary['date']} · device `{summary['device']}` ({summary['device_name']})"
        f"{' · dry run' if summary['dry_run'] else ''} · commit `{summary['commit']}` · {summary['seconds']:.0f} s",
        "",
        "| stage | status | seconds | limit (s) | reason |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in summary["stages"]:
        limit = s["timeout_s"] or "-"
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {limit} | {cell(s['reason'])} |")
    versions = summary.get("versions", {})
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    for s in summary["stages"]:
        if s["figures"] and s["name"] in ("resume", "fsdp", "gpu_tests"):
            lines += ["", f"{s['name']}: " + ", ".join(f"{k} {cell(v)}" for k, v in s["figures"].items())]
    lines += ["", "## Benchmark", "", *bench_section(bench)]
    lines += ["", "## LM head", "", *head_section(summary.get("head", {}))]
    if summary.get("compile"):
        lines += ["", "## train.compile (dpo-cli alone, 2048 tokens)", "", *bench_section(summary["compile"])]
    lines += ["", "## Where a step's time goes", "", *profile_section(summary.get("profile", {}))]
    failed = [s for s in summary["stages"] if s["status"] == "fail"]
    for s in failed:
        lines += ["", f"## {s['name']} failed: last lines of its log", "", "```", s.get("log_tail", ""), "```"]
    lines += ["", "Every stage's whole output: logs.txt."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--seconds", type=float, default=0.0, help="the whole check's time")
    args = parser.parse_args()
    env = read_json(args.work / "env.json")
    result = stages(args.work, args.out)
    summary = {
        "passed": not any(s["status"] == "fail" for s in result),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": args.device,
        "device_name": env.get("device", {}).get("name", "unknown"),
        "dry_run": args.dry_run,
        "commit": git_commit(Path(__file__).resolve().parents[2]),
        "seconds": args.seconds,
        "python": env.get("python"),
        "versions": env.get("versions", {}),
        "env": env,
        "stages": result,
        "head": read_json(args.work / "head.json"),
        "compile": read_json(args.work / "compile.json"),
        "profile": read_json(args.work / "profile.json"),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(markdown(summary, read_json(args.out / "bench.json")))
    for s in result:
        print(f"{s['name']:<10} {s['status']:<8} {s['seconds']:7.1f} s  {s['reason']}")
    print(f"{'PASS' if summary['passed'] else 'FAIL'}: {args.out}/summary.md")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
