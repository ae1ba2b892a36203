"""Entry points: `dpo-train` and `python -m dpo_cli`. Thin: compose the config, call train.run
(or preflight.run for mode=inspect)."""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dpo_cli.config import register_configs
from dpo_cli.distributed import broadcast_from_main
from dpo_cli.errors import UserError

log = logging.getLogger("dpo_cli")


def config_dir() -> str:
    """conf/ inside the installed package (wheel), or beside the package (source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"dpo-cli's conf/ directory was not found next to {here}")


_run_stamp: str | None = None


def run_stamp() -> str:
    """The timestamp naming this run's default output directory (`${run_stamp:}` in YAML).

    Under a multi-process launch every process composes the config itself, so each would take
    its own `now`; `main` makes them agree on the main process's before Hydra starts.
    """
    global _run_stamp
    if _run_stamp is None:
        _run_stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    return _run_stamp


def register() -> None:
    """Config schema and resolvers: called before any compose (CLI and tests alike)."""
    register_configs()
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from dpo_cli import preflight, train

    try:
        if cfg.mode == "inspect":
            preflight.run(cfg)
        else:
            train.run(cfg)
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            log.error("%s", e)
        sys.exit(2)


def main() -> None:
    global _run_stamp
    register()
    _run_stamp = broadcast_from_main(run_stamp())
    if int(os.environ.get("RANK", "0")) != 0:
        # Only the main process writes the run directory's .hydra/ (same content, one writer).
        sys.argv.append("hydra.output_subdir=null")
    _hydra_main()


if __name__ == "__main__":
    main()
