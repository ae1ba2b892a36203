#!/usr/bin/env python
"""The env stage of scripts/gpu/check.sh: what this machine runs, and whether dpo-cli imports on it.

    python scripts/gpu/env_probe.py --json env.json [--wheels .whl]

Prints and writes (JSON): Python, the device torch sees, CUDA, the versions of the libraries
dpo-cli trains with, and, for every wheel carried in --wheels, the requirements it declares that
the installed packages do not meet (they were installed with --no-deps, so pip checked none).
Exit 1 when dpo-cli's training modules (or TRL, for the benchmark) do not import.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import platform
import sys
from pathlib import Path

LIBRARIES = ("torch", "transformers", "accelerate", "trl", "peft", "datasets", "hydra-core", "omegaconf", "pyarrow")
# What a run needs to import: dpo-cli's loop (Hydra, datasets, ...) and TRL (scripts/bench.py's baseline).
IMPORTS = ("dpo_cli.cli", "dpo_cli.train", "trl")


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def unmet(wheels: Path) -> list[str]:
    """The carried wheels' requirements (extras and other Pythons' markers aside) that the
    installed versions do not satisfy, e.g. `datasets 5.2.0 needs pyarrow>=24.0.0, has 21.0.0`."""
    from packaging.requirements import Requirement

    problems = []
    for whl in sorted(wheels.glob("*.whl")):
        dist, have = whl.name.split("-")[0], whl.name.split("-")[1]
        for text in md.requires(dist) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            installed = version(req.name)
            if installed is None:
                problems.append(f"{dist} {have} needs {req}, which is not installed")
            elif not req.specifier.contains(installed, prereleases=True):
                problems.append(f"{dist} {have} needs {req}, has {installed}")
    return problems


def device() -> dict:
    import torch

    info = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(),
        )
    else:
        info.update(name=f"cpu ({platform.processor() or platform.machine()})", count=0)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--wheels", type=Path, default=None, help="the folder of carried wheels, if any")
    args = parser.parse_args()
    result = {"python": platform.python_version(), "executable": sys.executable, "versions": {}, "import_errors": {}}
    result["versions"] = {name: version(name) for name in LIBRARIES}
    result["device"] = device()
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as e:  # whatever a missing or mismatched package raises
            result["import_errors"][module] = f"{type(e).__name__}: {e}"
    result["unmet_requirements"] = unmet(args.wheels) if args.wheels and args.wheels.is_dir() else []
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if result["import_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
