"""Entry points: `dpo-train` and `python -m dpo_cli`. Thin: check the command line (every job's
config and the run directory, in overrides.py), then let Hydra compose the config and call
train.run (or preflight.run for mode=inspect, evalmode.run for mode=eval)."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from dpo_cli import config, overrides, rundir
from dpo_cli.config import register_configs
from dpo_cli.distributed import broadcast_from_main, exit_code_of, leave_launched, world_size_from_env
from dpo_cli.errors import UserError
from dpo_cli.schema import renamed

log = logging.getLogger("dpo_cli")


def config_dir() -> str:
    """conf/ inside the installed package (wheel), or beside the package (source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"dpo-cli's conf/ directory was not found next to {here}")


_run_stamp: str | None = None


def new_run_stamp(now: datetime | None = None) -> str:
    """`<date>/<time>-<6 random hex digits>`: the time alone (1-second resolution) would give
    two runs started in the same second one directory; the suffix keeps them apart (one
    collision in 16 million) without creating anything before the config is checked."""
    return f"{(now or datetime.now()).strftime('%Y-%m-%d/%H-%M-%S')}-{secrets.token_hex(3)}"


STAMP_ENV = "DPO_CLI_RUN_STAMP"


def run_stamp() -> str:
    """The stamp naming this run's default output directory (`${run_stamp:}` in YAML).

    Under a multi-process launch every process composes the config itself, so each would take
    its own stamp; `main` makes them agree on the main process's before Hydra starts. The jobs
    of a sweep on SLURM compose theirs in processes of their own, which inherit it from the
    environment (`main` exports it).
    """
    global _run_stamp
    if _run_stamp is None:
        _run_stamp = os.environ.get(STAMP_ENV) or new_run_stamp()
    return _run_stamp


def local_or_hub(path: str, hub_id: str) -> str:
    """`${local_or_hub:DIR,HUB_ID}` in YAML: DIR, as an absolute path, when it is a directory
    relative to the current directory or to the repository root (where `make smollm2` writes,
    so that it is found from anywhere in a source checkout); otherwise HUB_ID."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / Path(path).expanduser()
        if candidate.is_dir():
            return str(candidate.resolve())
    return hub_id


def resume_subdir() -> str:
    """`${resume_subdir:}` as hydra.output_subdir (overrides.check sets it for a sweep that
    continues its jobs): the job's own `.hydra/resume-N` when its directory holds an earlier
    run's `.hydra/`, else `.hydra`. Hydra resolves it in the job, once the job's directory is set."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ".hydra"
    return overrides.resume_subdir(Path(HydraConfig.get().runtime.output_dir)) or ".hydra"


def register() -> None:
    """Config schema and resolvers: called before any compose (CLI and tests alike)."""
    register_configs()
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp)
    if not OmegaConf.has_resolver("local_or_hub"):
        OmegaConf.register_new_resolver("local_or_hub", local_or_hub)
    if not OmegaConf.has_resolver("resume_subdir"):
        OmegaConf.register_new_resolver("resume_subdir", resume_subdir)


# A choice of the model group (model=X, +model=X, ~model, model@pkg=X) and a value for
# model.name_or_path (++ forces it) on the command line.
MODEL_CHOICE = re.compile(r"^[~+]*model(@[^=]*)?(=|$)")
NAME_OR_PATH = re.compile(r"^(\+\+)?model\.name_or_path=(.*)$")
_notes: list[str] = []  # INFO lines from before Hydra set up logging, logged once it has


def pretrained_by_default(argv: list[str]) -> list[str]:
    """`argv` with model=pretrained added when it sets model.name_or_path without choosing a
    model group: the default group, model=tiny, would add random_init (a conflict) and set the
    tiny model's learning rate and batch sizes. Added right after that override, so that the
    overrides stay together before any option (`--cfg job`) that argparse would split them at."""
    if any(MODEL_CHOICE.match(arg) for arg in argv[1:]):
        return argv
    for i, arg in enumerate(argv[1:], start=1):
        found = NAME_OR_PATH.match(arg)
        if found and found.group(2) not in ("", "null"):
            _notes.append(
                "model.name_or_path given without model=: using model=pretrained (conf/model/pretrained.yaml), "
                "so that the built-in tiny model's settings (random_init, optimizer.lr=1e-3, batch 64) do not apply"
            )
            return [*argv[: i + 1], "model=pretrained", *argv[i + 1 :]]
    return argv


# Spellings of earlier versions, still understood on the command line (the new one is logged).
# The scheduler and logger groups were flags and are keys now: group -> (key, option -> value).
FLAG_GROUPS = {
    "scheduler": ("scheduler.name", {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}),
    "logger": ("logger.wandb.mode", {"default": "online", "local": "disabled"}),
}


def _renamed(arg: str) -> str:
    """One override in this version's spelling: a flag group's choice as its key (a sweep's
    comma-separated choices too), a key that moved (schema.RENAMED_KEYS) under its new name."""
    group, sep, choice = arg.partition("=")
    if sep and group in FLAG_GROUPS:
        key, values = FLAG_GROUPS[group]
        options = choice.split(",")
        if all(o in values for o in options):
            return f"{key}={','.join(values[o] for o in options)}"
    prefix = re.match(r"^[+~]*", arg).group(0)  # type: ignore[union-attr]
    key = renamed(group.removeprefix(prefix)) if sep or prefix == "~" else None
    return f"{prefix}{key}{sep}{choice}" if key is not None else arg


def old_spellings(argv: list[str]) -> list[str]:
    """`argv` with each override of an earlier version's spelling rewritten (`_renamed`), noted."""
    out = argv[:1]
    for arg in argv[1:]:
        new = _renamed(arg)
        if new != arg:
            _notes.append(f"{arg!r} is spelled {new!r} now")
        out.append(new)
    return out


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from dpo_cli import preflight, slurm, train

    slurm.export_distributed_env()  # a multi-task SLURM job from the submitit launcher
    main_process = int(os.environ.get("RANK", "0")) == 0
    for note in _notes if main_process else ():
        log.info("%s", note)
    try:
        # The one conversion: every part below reads the typed config.
        typed = config.validate(cfg, command_line=list(HydraConfig.get().overrides.task))
        if typed.mode == "inspect":
            preflight.run(typed)
        elif typed.mode == "eval":
            from dpo_cli import evalmode

            evalmode.run(typed, train.run_dir_of())
        elif typed.task == "iterative":
            from dpo_cli import rounds

            rounds.run(typed, train.run_dir_of())
        else:
            train.run(typed)
    except UserError as e:
        if main_process:
            if not getattr(e, "reported", False):  # (train reports an error every process met itself)
                log.error("%s", e)
            _undo_start()
        _tell_launcher(e)
        sys.exit(e.exit_code)


# What each run (or sweep job) directory held before Hydra started (filled by overrides.check).
_before: dict[str, rundir.Before] = {}


def _undo_start() -> None:
    """A run that stopped with a user error before training leaves no run directory behind:
    what it wrote (Hydra's config and log, the lock) goes, unless it did more (rundir.undo_start)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    before = _before.get(os.path.abspath(hydra_cfg.runtime.output_dir))
    if before is not None:
        try:
            rundir.undo_start(before, f"{hydra_cfg.job.name}.log")
        except OSError as e:
            log.warning("could not remove what the failed start wrote in %s: %s", before.path, e)


def _tell_launcher(e: UserError) -> None:
    """Under torchrun or accelerate launch, put the message where the launcher reads a failed
    worker's error (TORCHELASTIC_ERROR_FILE, as torch's `record` does for an exception): its
    failure report then names it as the root cause, whichever process ended first, instead of
    "To enable traceback see ...". Every process writes its own file."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()))
    record = {"message": {"message": str(e), "extraInfo": {"py_callstack": str(e), "timestamp": stamp}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # the launcher then reports the exit code alone


def _exit_before_hydra(e: UserError, main_process: bool) -> NoReturn:
    """Leave with `e` as one log line, formatted as Hydra's are (its logging is not set up yet);
    under a launcher, every process leaves the process group it joined and exits with the code."""
    _tell_launcher(e)
    launched = torch.distributed.is_available() and torch.distributed.is_initialized()
    if launched:
        # Every process is here (they took the main process's verdict): leave the group together.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if main_process:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        log.addHandler(handler)
        try:
            log.error("%s", e)
        finally:
            log.removeHandler(handler)
    if launched:
        leave_launched(e.exit_code)
    sys.exit(e.exit_code)


def main() -> None:
    global _run_stamp
    register()
    _run_stamp = broadcast_from_main(new_run_stamp())
    os.environ[STAMP_ENV] = _run_stamp
    main_process = int(os.environ.get("RANK", "0")) == 0
    # Hydra reads sys.argv itself (and so does every job of a -m sweep), so the edits go there.
    sys.argv = pretrained_by_default(old_spellings(sys.argv))
    problem: tuple[str, int] | None = None
    try:
        # Every job's config, and the run directory, before Hydra creates anything.
        sys.argv = overrides.check(sys.argv, config_dir(), main_process, _before)
    except UserError as e:
        problem = (str(e), e.exit_code)
    # Every process follows the main one's verdict on the run directory (which another process's
    # Hydra could be creating by the time a slower one looks); the broadcast also keeps every
    # process from starting Hydra before all have looked.
    problem = broadcast_from_main(problem)
    if problem is not None:
        error = UserError(problem[0])
        error.exit_code = problem[1]
        _exit_before_hydra(error, main_process)
    if not main_process:
        # Only the main process writes the run directory's .hydra/ (same content, one writer).
        sys.argv.append("hydra.output_subdir=null")
    try:
        _hydra_main()  # returns when the run finished; a failed one ends in sys.exit
    except SystemExit as e:
        _leave_if_launched(e.code)
        raise
    _leave_if_launched(None)


def _leave_if_launched(code: object) -> None:
    """A process of a multi-process launch (torchrun, accelerate, a multi-task SLURM job) leaves
    through `distributed.leave_launched`; a single process returns to exit normally."""
    if world_size_from_env() > 1:
        leave_launched(exit_code_of(code))


# Resolvers at import: the jobs of a sweep on SLURM (submitit) import this module to run
# `_hydra_main`, and Hydra resolves the run directory there before calling it.
register()

if __name__ == "__main__":
    main()
