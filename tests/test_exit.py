"""How a process of a multi-process launch leaves (dpo_cli.distributed.leave_launched).

torch's DistributedDataParallel keeps the gloo process group alive after destroy_process_group;
tearing it down in interpreter finalization aborted a finished run's process now and then
("terminate called without an active exception"). The test shows the leak itself (if a torch
release fixes it, the test fails, and the workaround can go) and that both processes leave with
their exit code after their exit handlers ran. Every 2-process run of the suite (test_scale,
test_interrupt, test_cli) leaves through the same function, called by cli.main."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import BIN, free_port

LEAK = """
import atexit, os, torch, torch.distributed as dist
from dpo_cli.distributed import leave_launched

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)

atexit.register(lambda: open(f"exit-handlers-ran-{os.environ['RANK']}", "w").close())
dist.init_process_group("gloo")
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
del ddp
dist.barrier()
dist.destroy_process_group()
print(f"rank {os.environ['RANK']} gloo threads after destroy: {gloo_threads()}", flush=True)
leave_launched(0)
raise SystemExit("not reached: leave_launched returned")
"""


def _torchrun(tmp_path, script: str) -> subprocess.CompletedProcess:
    path = tmp_path / "launched.py"
    path.write_text(script)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(path)]
    env = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PATH": str(BIN), "HOME": str(tmp_path)}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
def test_a_launched_process_leaves_after_its_exit_handlers_while_ddp_keeps_gloo_alive(tmp_path):
    proc = _torchrun(tmp_path, LEAK)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for rank in (0, 1):  # (both processes write to one pipe: a line may not start where it began)
        threads = re.search(rf"rank {rank} gloo threads after destroy: (\[[^\]]*\])", proc.stdout)
        assert threads and "pt_gloo_runloop" in threads[1], out  # the group outlives destroy_process_group
    # Both processes left through leave_launched (exit 0), their exit handlers run first.
    assert sorted(p.name for p in tmp_path.glob("exit-handlers-ran-*")) == [
        "exit-handlers-ran-0",
        "exit-handlers-ran-1",
    ]
    assert "not reached" not in out and "terminate called" not in out
