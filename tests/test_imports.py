"""Every module of the package imports, and importing changes no global state."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest

import dpo_cli

# dpo_cli.__main__ runs the CLI when imported.
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(dpo_cli.__path__, prefix="dpo_cli.") if m.name != "dpo_cli.__main__"
)


def test_walk_finds_the_package():
    for name in ("dpo_cli.losses", "dpo_cli.logprobs", "dpo_cli.train", "dpo_cli.cli", "dpo_cli.data.formats.hh"):
        assert name in MODULES
    assert "dpo_cli.__main__" not in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_import(name):
    module = importlib.import_module(name)
    assert module.__name__ == name


# Run in a fresh interpreter: by now this process has imported everything already.
_PROBE = """
import json, os, sys
import torch

def state():
    return {
        "env": dict(os.environ),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "default_dtype": str(torch.get_default_dtype()),
        "threads": torch.get_num_threads(),
        "grad_enabled": torch.is_grad_enabled(),
        # GPU-side machinery loads only where a run uses it (flex_attention, train.compile)
        "gpu_modules": sorted(m for m in ("triton", "torch._inductor", "torch.nn.attention.flex_attention") if m in sys.modules),
    }

before = state()
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"before": before, "after": state()}))
"""


@pytest.mark.integration
def test_imports_change_no_global_state():
    """STYLE.md: never change global state at import time (TF32 flags, env vars); and nothing
    GPU-only (Triton, inductor, FlexAttention) is imported at start-up."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *MODULES], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = result["before"], result["after"]
    env_before, env_after = before.pop("env"), after.pop("env")
    changed = {k for k in env_before.keys() | env_after.keys() if env_before.get(k) != env_after.get(k)}
    assert not changed, f"importing dpo_cli changed environment variables: {sorted(changed)}"
    assert after == before
    assert after["gpu_modules"] == []
