"""Checks on the `dpo-train` command line, before Hydra runs it (called by `cli.main`).

Left to itself, Hydra reports only the first override it refuses (in its own words, and
without a hint for a misspelled key), creates the run directory (`.hydra/`, `train.log`)
before `train.run` validates the config, runs a `-m` sweep until its first invalid job and
stops there, and fails with a logging traceback when the run directory cannot be written.
So the command line is composed here first, the way Hydra will compose it, once per job
of a sweep: every problem of every job is reported in one message, and nothing is created
or started unless all of them are valid.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import itertools
import os
import re
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from dpo_cli import config, keys, rundir
from dpo_cli.distributed import world_size_from_env
from dpo_cli.errors import ConfigError, UserError

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Options that make Hydra print something (or look elsewhere for its configs) instead of running.
HYDRA_ONLY = ("help", "hydra_help", "info", "shell_completion")
HYDRA_ONLY += ("config_path", "config_name", "config_dir", "experimental_rerun")


class SweepError(ConfigError):
    """Config problems in some jobs of a `-m` sweep, found before any job started."""

    def __init__(self, problems: list[str], bad_jobs: int, jobs: int):
        super().__init__(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        Exception.__init__(
            self, f"invalid sweep: {bad_jobs} of {jobs} jobs have config problems; no job was started:\n{lines}"
        )


def check_writable(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """Raise UserError unless `run_dir` can be created and written: its nearest existing
    ancestor must be a directory this process may write into. Checked before Hydra starts,
    which would otherwise fail setting up its log file, with a traceback."""
    existing = Path(os.path.abspath(run_dir))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        why = f"{existing} is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing} is read-only / permission denied"
    else:
        return
    what = "sweep directory" if key == "hydra.sweep.dir" else "run directory"
    raise UserError(f"cannot write the {what} {run_dir} ({why}); choose another with {key}=DIR")


def resume_subdir(run_dir: Path) -> str | None:
    """`.hydra/resume-N`, the first N free, when `run_dir` already holds a run's `.hydra/`:
    Hydra would otherwise overwrite that run's config.yaml and overrides.yaml with this one's.
    None (Hydra writes `.hydra/` itself) when there is none, or when the start that wrote it
    never trained a step (no metrics, checkpoint or final model) and no run holds the
    directory now: that config describes nothing, and this start's must be the one `mode=eval`
    and a later resume read."""
    if not (run_dir / ".hydra").is_dir() or rundir.never_trained(run_dir):
        return None
    n = 1
    while (run_dir / ".hydra" / f"resume-{n}").exists():
        n += 1
    return f".hydra/resume-{n}"


def with_override(argv: list[str], overrides: list[str], extra: str) -> list[str]:
    """`argv` with `extra` right after its last override, so that the overrides stay one run of
    arguments (argparse refuses overrides on both sides of an option like `--cfg job`)."""
    if not overrides:
        return [*argv, extra]
    end = max(i for i, arg in enumerate(argv) if arg == overrides[-1]) + 1
    return [*argv[:end], extra, *argv[end:]]


def _hydra_args(argv: list[str]) -> argparse.Namespace:
    from hydra._internal.utils import get_args_parser  # how @hydra.main reads sys.argv

    return get_args_parser().parse_args(argv[1:])


def sweep_jobs(overrides: list[str]) -> list[tuple[list[str], str]] | None:
    """(overrides, the swept values as `key=value ...`) of each job of a `-m` sweep, in Hydra's
    job order (BasicSweeper: the cartesian product, the first swept key varying slowest, a
    later override of a key replacing an earlier one). None when a sweep cannot be listed
    (`interval(...)`, for a sweeper plugin): Hydra then checks it itself."""
    loader = GlobalHydra.instance().hydra.config_loader  # type: ignore[union-attr]  # glob(...) needs it
    parser = OverridesParser.create(config_loader=loader)
    choices: dict[str, list[str]] = {}
    swept: set[str] = set()
    for line in overrides:
        try:
            (o,) = parser.parse_overrides([line])
        except HydraException:
            choices[line] = [line]  # every job reports it (compose_job)
            continue
        key = o.get_key_element()
        if not o.is_sweep_override():
            choices[key] = [line]
            swept.discard(key)
        elif o.is_discrete_sweep():
            choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
            swept.add(key)
        else:
            return None
    jobs = [list(job) for job in itertools.product(*choices.values())]
    keys = list(choices)
    return [(job, " ".join(o for k, o in zip(keys, job, strict=True) if k in swept)) for job in jobs]


def _culprit(e: Exception, overrides: list[Override]) -> tuple[Override | None, str | None]:
    """The override Hydra refused in `e`, and the key it tried to set when that key does not
    exist (reported with a suggestion once the rest has composed)."""
    msg = str(e)
    key = re.search(r"Could not override '([^']+)'", msg)
    group = re.search(r"Could not find '([^']+)/[^'/]+'", msg)
    for o in overrides:
        if key and o.key_or_group == key.group(1):
            return o, key.group(1)
        if group and o.key_or_group == group.group(1):
            return o, None
        if f"'{o.input_line}'" in msg or msg.endswith(f" {o.input_line}") or f" {o.input_line}\n" in msg:
            return o, None
    return next((o for o in overrides if f"'{o.key_or_group}'" in msg), None), None


def _one_line(e: Exception, culprit: Override | None = None) -> str:
    """`override: Hydra's message and its cause` on one line (without OmegaConf's full_key,
    object_type lines and Hydra's config search path)."""
    parts = [str(e), str(e.__cause__ or "")]
    if getattr(e, "options", None):  # MissingConfigException: the group's options
        parts = [str(e).split("\n")[0], "available: " + ", ".join(e.options)]  # type: ignore[attr-defined]
    lines = [re.sub(r"^In '[^']*': ", "", line.strip()) for part in parts for line in part.splitlines()]
    noise = re.compile(r"(full_key|reference_type|object_type)\b|Config search path|provider=|Error merging override")
    text = "; ".join(line for line in lines if line and not noise.match(line))
    return f"{culprit.input_line}: {text}" if culprit is not None else text


def compose_job(overrides: list[str]) -> tuple[DictConfig | None, list[str]]:
    """The config `overrides` compose to (with Hydra's node), and a problem for each override
    Hydra refused: each refused override is dropped and the rest composed again, so that one
    message lists them all. The config is None when the rest does not compose either."""
    parser = OverridesParser.create()
    remaining: list[Override] = []
    problems: list[str] = []
    for i, line in enumerate(overrides):
        try:
            remaining += parser.parse_overrides([line])
        except HydraException as e:
            text = re.sub(r"^Error parsing override '.*?'; ", "", _one_line(e))  # named once, in front
            problems.append(f"{line}: {text}{quoting_hint(line, overrides[i - 1] if i else None)}")
    unknown: list[str] = []
    cfg = None
    while cfg is None:
        try:
            cfg = compose("config", [o.input_line for o in remaining], return_hydra_config=True)
        except AssertionError:
            # OmegaConf asserts (no message naming the key) when an override reaches into a
            # section that is null here, e.g. model.random_init.hidden_size with model=pretrained.
            culprit = _null_section_override(remaining)
            if culprit is None:
                raise
            problems.append(
                f"{culprit.input_line}: {culprit.key_or_group} lies inside a section that is null in this config "
                "(for example model.random_init.* with model=pretrained); remove it, or choose the group that has it"
            )
            remaining.remove(culprit)
        except (HydraException, OmegaConfBaseException) as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            culprit, key = _culprit(e, remaining)
            if key is not None:
                unknown.append(key)
            else:
                problems.append(_one_line(e, culprit))
            if culprit is None:
                break
            remaining.remove(culprit)
    task = _task(cfg) if cfg is not None and unknown else None  # the keys it holds, for suggestions
    return cfg, [keys.not_a_key(k, task) for k in unknown] + problems


def quoting_hint(line: str, previous: str | None) -> str:
    """How to quote an override Hydra's grammar refused: a word without `=` after an override
    is most often the rest of a value the shell split at a space (an unquoted path); a value
    holding ( ) [ ] { } , = or quotes must be quoted for Hydra too, inside the shell's quotes."""
    if line.startswith("${"):  # an interpolation alone: the key it should set is missing
        return f"; an override is KEY=VALUE: set a key to it, e.g. 'train.seed={line}'"
    if "=" not in line and not line.startswith("~") and previous is not None and "=" in previous:
        return (
            f"; if it is the rest of {previous!r}, the shell split a value at a space: quote the whole override, "
            f"e.g. '{previous} {line}'"
        )
    key, sep, value = line.partition("=")
    if sep and "'" not in value:
        return f"; quote the value for Hydra inside the shell's quotes, e.g. \"{key}='{value}'\""
    return ""


def _null_section_override(overrides: list[Override]) -> Override | None:
    """The first override without which the others compose (the one OmegaConf asserted on);
    dotted keys are tried before group choices, which only decide what is null."""
    for o in sorted(overrides, key=lambda o: "." not in o.key_or_group):
        try:
            compose("config", [x.input_line for x in overrides if x is not o], return_hydra_config=True)
            return o
        except Exception:  # noqa: BLE001 - still failing: not this one
            continue
    return None


def _task(cfg: DictConfig) -> DictConfig:
    """The config the job sees: `cfg` without Hydra's node (as Hydra passes it to the job)."""
    task = copy.deepcopy(cfg)
    with open_dict(task):
        del task["hydra"]
    return task


def job_problems(cfg: DictConfig, full: bool) -> list[str]:
    """What `config.validate` finds in a composed job (`full`), or only its unknown keys; first
    the sections a `~key` removed and the values that do not resolve, which validation (and
    training) would otherwise meet as a traceback; then, under a launcher, the batch's split
    over its processes, so that every process stops here, before Hydra writes anything."""
    task = _task(cfg)
    if not full:
        return keys.unknown_keys(task)
    found = _removed_sections(task) + _unresolvable(task)
    if found:
        return found
    try:
        typed = config.validate(task, quiet=True, command_line=list(cfg.hydra.overrides.task))
        if world_size_from_env() > 1:
            config.check_world(typed.train, world_size_from_env())
    except ConfigError as e:
        return e.problems
    except OmegaConfBaseException:
        return []  # a value that resolves only inside the run (${hydra:...}): train.run validates it there
    return []


def _removed_sections(task: DictConfig) -> list[str]:
    """A problem for each top-level key of the schema that `~key` removed from the config."""
    problems = []
    for f in fields(config.Config):
        if f.name not in task:
            how = f"{f.name}=VALUE" if f.type in ("str", str) else f"{f.name}.KEY=VALUE"
            problems.append(
                f"~{f.name} removed {f.name}, which every run needs: drop ~{f.name} from the command line "
                f"(and set a value with {how})"
            )
    return problems


# `${hydra:...}` resolves only inside the run (Hydra sets its node there): not checked here.
HYDRA_RESOLVER = re.compile(r"\$\{hydra:")


def _unresolvable(node: Any, prefix: str = "") -> list[str]:
    """A problem for each value of `node` whose interpolation does not resolve (an unset
    environment variable, a key that does not exist, a value of the wrong type), naming the
    key, the interpolation and the fix."""
    problems: list[str] = []
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        name = f"{prefix}[{key}]" if isinstance(node, ListConfig) else f"{prefix}.{key}" if prefix else str(key)
        child = node._get_node(key)
        if child._is_interpolation():
            raw = str(child._value())
            if HYDRA_RESOLVER.search(raw):
                continue
            try:
                node[key]
            except OmegaConfBaseException as e:
                problems.append(_interpolation_problem(name, raw, e))
        elif isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
            problems += _unresolvable(child, name)
    return problems


def _interpolation_problem(key: str, raw: str, e: OmegaConfBaseException) -> str:
    reason = re.sub(r"^(While dereferencing interpolation '[^']*': |.*? raised while resolving interpolation: )", "",
                    str(e).splitlines()[0]).strip('"')  # fmt: skip
    variable = re.search(r"Environment variable '([^']+)' not found", reason)
    missing = re.search(r"Interpolation key '([^']+)' not found", reason)
    if variable:
        name = variable.group(1)
        return (
            f"{key}={raw} does not resolve: the environment variable {name} is not set; set it, or give a "
            f"default: ${{oc.env:{name},DEFAULT}}"
        )
    if missing:
        return f"{key}={raw} does not resolve: the config has no key {missing.group(1)}; name an existing key"
    return f"{key}={raw} does not resolve: {reason}; give {key} a plain value of its type"


def _raise_problems(jobs: list[tuple[list[str], str]], problems: list[list[str]], multirun: bool) -> None:
    """One ConfigError for a run; for a sweep, one SweepError naming each job's swept values
    (problems every job shares are listed once)."""
    if not any(problems):
        return
    if not multirun or len(jobs) == 1:
        raise ConfigError(problems[0])
    shared = [p for p in problems[0] if all(p in job for job in problems)]
    lines = list(shared)
    for n, ((_, label), job) in enumerate(zip(jobs, problems, strict=True)):
        lines += [f"job {n} ({label}): {p}" for p in job if p not in shared]
    raise SweepError(lines, sum(1 for job in problems if job), len(jobs))


def check(
    argv: list[str], config_dir: str, main_process: bool = True, before: dict[str, rundir.Before] | None = None
) -> list[str]:
    """Check a `dpo-train` command line (sys.argv) before Hydra runs it; return it, with
    `hydra.output_subdir=.hydra/resume-N` added when the run goes into a directory that holds
    an earlier run's `.hydra/` (a resume), so that the original's config stays as it was
    (`${resume_subdir:}`, each job's own, for a sweep that continues its jobs), or with a
    temporary run directory for mode=inspect, which writes nothing. `before` receives what each
    run (or job) directory held, for `rundir.undo_start`.

    Raises ConfigError (SweepError for `-m`) listing the problems of every job, then UserError
    when the run directory cannot be written. `--cfg` checks only that the config composes
    without unknown keys; help, `--info` and other config directories are left to Hydra."""
    args = _hydra_args(argv)
    if any(getattr(args, name, None) for name in HYDRA_ONLY):
        return argv
    overrides: list[str] = list(args.overrides)
    multirun = args.multirun or "hydra.mode=MULTIRUN" in overrides
    full = not args.cfg
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        jobs = sweep_jobs(overrides) if multirun else [(overrides, "")]
        if jobs is None:
            return argv
        composed = [compose_job(job) for job, _ in jobs]
        first = composed[0][0]
        if multirun and first is not None and first.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            jobs, composed = jobs[:1], composed[:1]  # another sweeper lists its own jobs
        problems = [found + (job_problems(cfg, full) if cfg is not None else []) for cfg, found in composed]
        _raise_problems(jobs, problems, multirun)
        if not full:
            return argv
        assert first is not None
        basic = not multirun or "BasicLauncher" in str(first.hydra.launcher.get("_target_"))
        if basic and all(cfg.mode == "inspect" for cfg, _ in composed):
            return _scratch_run_dir(argv, overrides, multirun)
        listed = not multirun or first.hydra.sweeper.get("_target_") == BASIC_SWEEPER
        if listed:
            argv = _guard_run_dirs(argv, overrides, jobs, [cfg for cfg, _ in composed], multirun, main_process, before)
        return _prepare_run_dir(argv, overrides, first.hydra, multirun, main_process, first.mode)


def _prepare_run_dir(
    argv: list[str], overrides: list[str], hydra: Any, multirun: bool, main_process: bool, mode: str = "train"
) -> list[str]:
    """Check that the run (or sweep) directory can be written, and that mode=eval does not go
    into a training run's; on the main process, direct a resume's Hydra files to
    `.hydra/resume-N`."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        run_dir = Path(OmegaConf.select(hydra, key.removeprefix("hydra."), throw_on_missing=True))
    except OmegaConfBaseException:
        return argv  # resolves only inside the run (${hydra:...}); Hydra reports what fails
    check_writable(run_dir, key)
    if mode == "eval" and not multirun:
        from dpo_cli.evalmode import check_output_dir  # mode=eval only: it imports torch

        check_output_dir(run_dir)
    if multirun or not main_process or hydra.output_subdir != ".hydra":
        return argv
    subdir = resume_subdir(run_dir)
    return argv if subdir is None else with_override(argv, overrides, f"hydra.output_subdir={subdir}")


def _scratch_run_dir(argv: list[str], overrides: list[str], multirun: bool) -> list[str]:
    """mode=inspect writes nothing: Hydra's run (or sweep) directory, where it writes its config
    and log, becomes a temporary one, removed when this process exits."""
    scratch = tempfile.mkdtemp(prefix="dpo-cli-inspect-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return with_override(argv, overrides, f"hydra.{'sweep' if multirun else 'run'}.dir={scratch}")


def _job_dirs(cfgs: list[DictConfig], multirun: bool) -> list[Path] | None:
    """Each job's output directory as Hydra will name it (the sweep's jobs numbered in order);
    None when it resolves only inside the run (`${hydra:...}`)."""
    dirs = []
    for n, cfg in enumerate(cfgs):
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.job.num, cfg.hydra.job.id = n, str(n)
        try:
            if not multirun:
                dirs.append(Path(OmegaConf.select(cfg, "hydra.run.dir", throw_on_missing=True)))
                continue
            sweep = OmegaConf.select(cfg, "hydra.sweep.dir", throw_on_missing=True)
            dirs.append(Path(sweep) / str(OmegaConf.select(cfg, "hydra.sweep.subdir", throw_on_missing=True)))
        except OmegaConfBaseException:
            return None
    return dirs


def _guard_run_dirs(
    argv: list[str],
    overrides: list[str],
    jobs: list[tuple[list[str], str]],
    cfgs: list[DictConfig],
    multirun: bool,
    main_process: bool,
    before: dict[str, rundir.Before] | None,
) -> list[str]:
    """Before Hydra writes into the run directory (each job's, for a sweep): refuse
    train.resume=auto into a directory of other files, and a sweep whose job directories hold
    runs whose records it would rewrite (rundir.sweep_problem); note what each held (`before`);
    for a sweep that continues its jobs, direct each job's Hydra files to its own
    `.hydra/resume-N` (`${resume_subdir:}`, resolved by Hydra in the job)."""
    dirs = _job_dirs(cfgs, multirun)
    if dirs is None:
        return argv
    if multirun:
        tasks = [OmegaConf.to_container(_task(cfg), resolve=False) for cfg in cfgs]
        sweep_dir = Path(OmegaConf.select(cfgs[0], "hydra.sweep.dir"))
        problem = rundir.sweep_problem(
            sweep_dir, [(label, d, t) for (_, label), d, t in zip(jobs, dirs, tasks, strict=True)]
        )
        if problem is not None:
            raise UserError(problem)
    elif cfgs[0].train.resume == "auto":
        rundir.check_resumable(dirs[0])
    if before is not None:
        before.update({str(b.path): b for b in map(rundir.before, dirs)})
    if multirun and main_process and cfgs[0].hydra.output_subdir == ".hydra" and any(map(rundir.holds_run, dirs)):
        return with_override(argv, overrides, "hydra.output_subdir=${resume_subdir:}")
    return argv
