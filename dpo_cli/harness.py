"""Benchmarks through EleutherAI's lm-evaluation-harness (`eval.harness.*`), on the model in memory.

    dpo-train mode=eval model.name_or_path=RUN/final eval.harness.tasks=[arc_easy,hellaswag]
    dpo-train mode=eval model.name_or_path=RUN/final eval.harness.tasks=[sort_choice] eval.harness.include_path=examples/harness

The loaded policy (a LoRA run's with its adapter on) and its tokenizer are wrapped in lm_eval's
`HFLM` as they are: nothing is loaded again from disk or the Hub, so the numbers are those of the
weights dpo-cli evaluates, and the reference (`eval.harness.reference`) is the one `mode=eval`
(or the run) already holds. Each task's metrics become `harness/<task>/<metric>` (and
`harness_ref/...` for the reference; a filter other than lm_eval's `none` is appended,
`harness/gsm8k/exact_match/strict-match`); lm_eval's whole output is kept in
`<run dir>/harness/{policy,reference}/results.json`, with the scored samples beside it.

The task names, and whether their datasets can be had, are checked when the config is validated,
before any weights load (`task_problems`): lm_eval is imported only then, when tasks are set.
Indexing lm_eval's ~15k task files takes about 20 s; names all found in `include_path` skip it.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dpo_cli.errors import ConfigError
from dpo_cli.hub import hub_reachable, offline_setting
from dpo_cli.schema import HarnessConfig

log = logging.getLogger(__name__)

# datasets' builders for local files: a task whose dataset_path is one of these reads its data_files.
FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")
HOW_TO_LIST = (
    "list the tasks with `lm-eval ls tasks` (yours too: `lm-eval ls tasks --include_path DIR`), or put your own "
    "task YAMLs in a directory and set eval.harness.include_path=DIR (an example: examples/harness)"
)


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, defaults: bool) -> Any:
    """lm_eval's TaskManager over `include_path` (and lm_eval's own tasks when `defaults`), built
    once per process: the config is validated twice (before Hydra starts, then in the job) and
    the run evaluates with the same index."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def _include(h: HarnessConfig) -> str | None:
    return str(Path(h.include_path).expanduser().resolve()) if h.include_path else None


def resolve(h: HarnessConfig) -> tuple[Any, list[str]]:
    """The TaskManager that knows every name of eval.harness.tasks and the names it does not know.
    Tasks all found in include_path use that directory's index alone (no indexing of lm_eval's own)."""
    include = _include(h)
    if include is not None:
        local = task_manager(include, False)
        if all(_is_task(local, name) for name in h.tasks):
            return local, []
    manager = task_manager(include, True)
    return manager, [name for name in h.tasks if name not in manager.task_index]


def _is_task(manager: Any, name: str) -> bool:
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    return entry is not None and entry.kind in (Kind.TASK, Kind.PY_TASK)


def task_problems(h: HarnessConfig) -> list[str]:
    """What keeps eval.harness.tasks from running: an include_path that is no directory, names
    lm_eval does not know, datasets that cannot be had (see `dataset_problems`). No weights load."""
    if not h.tasks:
        return []
    try:
        import lm_eval  # noqa: F401  (task_problems reads its task index next)
    except ImportError:
        return [
            "eval.harness.tasks needs EleutherAI's lm-evaluation-harness, which is not installed; "
            "install it with: pip install 'dpo-cli[harness]' (or pip install lm_eval)"
        ]
    if h.include_path and not Path(h.include_path).expanduser().is_dir():
        return [
            f"eval.harness.include_path={h.include_path!r} is not a directory; give the directory of your task YAMLs"
        ]
    manager, unknown = resolve(h)
    if unknown:
        where = f" nor in eval.harness.include_path={h.include_path}" if h.include_path else ""
        close = [m for name in unknown for m in difflib.get_close_matches(name, manager.all_tasks, n=3)]
        hint = f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""
        return [
            f"eval.harness.tasks: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} no task, group or tag "
            f"of lm_eval{where}{hint}; {HOW_TO_LIST}"
        ]
    return dataset_problems(manager, h.tasks)


def _leaves(manager: Any, name: str, seen: set[str]) -> list[Any]:
    """The index entries of the tasks `name` stands for (a group's or tag's members, recursively)."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None or name in seen:
        return []
    seen.add(name)
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        return [entry]
    members = entry.tags if entry.kind == Kind.TAG else (entry.cfg or {}).get("task", [])
    members = members if isinstance(members, (list, set, tuple)) else [members]
    return [leaf for m in members if isinstance(m, str) for leaf in _leaves(manager, m, seen)]


def dataset_problems(manager: Any, names: list[str]) -> list[str]:
    """Datasets the tasks cannot have: local data_files that do not exist (lm_eval reads a relative
    one from the working directory), and Hub datasets while the Hub cannot be reached (HF_HUB_OFFLINE,
    or no connection) that the datasets cache does not hold either. Checked from the task YAMLs:
    a task whose Python code loads data (`custom_dataset`, a `class`) is not checked."""
    seen: set[str] = set()
    problems, hub = [], {}
    for entry in (leaf for name in names for leaf in _leaves(manager, name, seen)):
        cfg = entry.cfg or {}
        path = cfg.get("dataset_path")
        if not isinstance(path, str) or cfg.get("custom_dataset") is not None:
            continue
        if path in FILE_BUILDERS:
            files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
            files = files.values() if isinstance(files, dict) else files if isinstance(files, list) else [files]
            missing = [f for f in files if isinstance(f, str) and "*" not in f and not Path(f).expanduser().exists()]
            problems += [
                f"eval.harness.tasks: task {entry.name} reads data_files {f!r}, which does not exist (lm_eval reads "
                f"a relative path from the working directory, {os.getcwd()}); fix the path in {entry.yaml_path}"
                for f in missing
            ]
        elif not os.path.exists(os.path.expanduser(path)):
            hub.setdefault(path, entry.name)
    uncached = {path: task for path, task in hub.items() if not _cached(path)}
    if uncached and not hub_reachable():
        setting = offline_setting()
        reason = f"{setting} is set" if setting else "the Hub cannot be reached from here"
        listed = ", ".join(f"{task} ({path})" for path, task in uncached.items())
        problems.append(
            f"eval.harness.tasks: {listed} read their dataset from the Hugging Face Hub, and {reason}, with no copy "
            "in the datasets cache; run where the Hub is reachable (once: the cache keeps it), or use tasks over "
            "local files (dataset_path: json with dataset_kwargs.data_files, in eval.harness.include_path; see "
            "examples/harness)"
        )
    return problems


def _cached(dataset: str) -> bool:
    """Whether a Hub dataset has a copy in the datasets cache or the Hub cache (as datasets names them)."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    return (Path(datasets_config.HF_DATASETS_CACHE) / dataset.replace("/", "___")).is_dir() or (
        Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    ).is_dir()


def plan(h: HarnessConfig) -> str:
    """One line for mode=inspect: which benchmarks a run would score, on what, when (the names
    are checked by then)."""
    if not h.tasks:
        return "benchmarks (lm-evaluation-harness): off (eval.harness.tasks=[])"
    models = "the policy and the reference" if h.reference else "the policy"
    when = "after the last step" if h.at_end else "in mode=eval"
    size = f"the first {h.limit} examples" if h.limit else "all examples"
    shots = f"{h.num_fewshot}-shot" if h.num_fewshot is not None else "each task's few-shot default"
    where = f"; your tasks from {h.include_path}" if h.include_path else ""
    return (
        f"benchmarks (lm-evaluation-harness): {', '.join(h.tasks)} on {models} {when}, {size} of each, {shots}{where}"
    )


def check_launch(h: HarnessConfig, accelerator: Any) -> None:
    """The harness runs the whole model on the main process: refuse a launch that shards it."""
    from dpo_cli.distributed import sharded

    if h.tasks and sharded(accelerator):
        raise ConfigError(
            [
                "eval.harness.tasks: the harness runs the whole model on the main process, and this launch shards it "
                "(FSDP or DeepSpeed ZeRO-3); evaluate final/ with mode=eval on one process instead"
            ]
        )


def flatten(results: dict[str, dict[str, Any]], prefix: str) -> dict[str, float]:
    """lm_eval's `results` ({task: {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}}) as
    flat metrics `prefix/task/acc`, `prefix/task/acc_stderr`; a filter other than `none` is
    appended (`prefix/task/exact_match/strict-match`); values that are no numbers ("N/A") are left out."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out[f"{prefix}/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return out


def run(model: Any, tokenizer: Any, h: HarnessConfig, out_dir: Path, prefix: str) -> dict[str, float]:
    """Evaluate `model` (in memory, as it is) on eval.harness.tasks; write lm_eval's output to
    `out_dir` (results.json, samples_<task>.jsonl); return the flat metrics under `prefix`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    manager, unknown = resolve(h)
    assert not unknown  # task_problems refused them
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=h.batch_size)  # puts the model in eval mode
        output = simple_evaluate(
            model=lm, tasks=list(h.tasks), num_fewshot=h.num_fewshot, limit=h.limit, task_manager=manager,
            log_samples=True,
        )  # fmt: skip
    finally:
        model.train(was_training)
    write(output, out_dir)
    log.info("lm-evaluation-harness, %s:\n%s", prefix, make_table(output))
    return flatten(output["results"], prefix)


def write(output: dict[str, Any], out_dir: Path) -> None:
    """lm_eval's output: results.json (all but the samples), samples_<task>.jsonl (one scored example a line)."""
    from lm_eval.utils import handle_non_serializable

    out_dir.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in output.items() if k != "samples"}
    (out_dir / "results.json").write_text(json.dumps(record, indent=2, default=handle_non_serializable) + "\n")
    for task, samples in output.get("samples", {}).items():
        lines = (json.dumps(s, default=handle_non_serializable, ensure_ascii=False) for s in samples)
        (out_dir / f"samples_{task}.jsonl").write_text("".join(line + "\n" for line in lines))


def evaluate(
    h: HarnessConfig, policy: Any, tokenizer: Any, reference: Any, run_dir: Path, main_process: bool
) -> dict[str, float]:
    """The policy's metrics (harness/...), and with eval.harness.reference the reference's
    (harness_ref/...; `reference()` gives a context holding the reference model), on the main
    process only ({} elsewhere): lm_eval's HFLM runs a model it is handed on one process."""
    if not main_process or not h.tasks:
        return {}
    values = run(policy, tokenizer, h, run_dir / "harness" / "policy", "harness")
    if h.reference:
        with reference() as model:
            values.update(run(model, tokenizer, h, run_dir / "harness" / "reference", "harness_ref"))
    return values


@contextmanager
def held_reference(reference: Any) -> Iterator[Any]:
    """The reference model a training run holds at its end: its own frozen model, or, under LoRA,
    the policy with its adapter off (config.validate refuses eval.harness.reference where neither is kept)."""
    from dpo_cli.reference import AdapterReference, ModelReference

    if isinstance(reference, ModelReference) and reference.model is not None:
        yield reference.model
    elif isinstance(reference, AdapterReference) and reference.adapter_off:
        with reference.model.disable_adapter():
            yield reference.model
    else:
        raise ConfigError(["eval.harness.reference=true: this run keeps no reference model to evaluate at its end"])
