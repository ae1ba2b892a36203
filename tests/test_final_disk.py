"""final/ on a full disk: written whole or not at all, with the way back named. It used to end
in an ENOSPC traceback (exit 1), a half-written final/ with a 0-byte config.json, and stray
report temporaries. A real full disk: a small tmpfs (mounting needs root, as CI has)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dpo_cli import checkpoint
from dpo_cli.errors import UserError


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Take all of the disk's free space but `leave` bytes."""
    filler = disk / "filler"
    st = os.statvfs(disk)  # not shutil.disk_usage, which a test may make lie
    with open(filler, "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


ARGS = ["train.max_steps=2", "train.save_every=2", "train.eval_every=null", "judge=none"]


def _run_filling_before_final(train_run, monkeypatch, run_dir: Path, disk: Path, leave: int):
    real = checkpoint.save_final

    def full_then_save(*args, **kwargs):
        _fill(disk, leave)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_final", full_then_save)
    with pytest.raises(UserError) as e:
        train_run(ARGS, run_dir)
    monkeypatch.setattr(checkpoint, "save_final", real)
    return str(e.value)


def _assert_nothing_half_written(run_dir: Path) -> None:
    assert not (run_dir / "final").exists()
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name or p.name.startswith("final.")]
    assert checkpoint.verify(run_dir / "checkpoints" / "step-2") is None


@pytest.mark.integration
def test_too_little_space_for_final_is_refused_before_writing(train_run, monkeypatch, small_disk):
    run_dir = small_disk / "run"
    message = _run_filling_before_final(train_run, monkeypatch, run_dir, small_disk, leave=64 * 1024)
    assert "not enough free disk space" in message and "train.resume=auto" in message
    assert "checkpoints/step-2" in message
    _assert_nothing_half_written(run_dir)


@pytest.mark.integration
def test_a_disk_that_fills_while_writing_final_leaves_nothing_half_written(train_run, monkeypatch, small_disk):
    """The space check passes (the disk looks empty), the write then meets the real ENOSPC."""
    run_dir = small_disk / "run"
    roomy = shutil._ntuple_diskusage(10**12, 0, 10**12)
    monkeypatch.setattr(checkpoint.export.shutil, "disk_usage", lambda path: roomy)
    message = _run_filling_before_final(train_run, monkeypatch, run_dir, small_disk, leave=300 * 1024)
    assert "could not write" in message and "No space left on device" in message
    _assert_nothing_half_written(run_dir)
    # Space freed, the same command with train.resume=auto writes final/ from the checkpoint.
    os.remove(small_disk / "filler")
    monkeypatch.undo()
    train_run([*ARGS, "train.resume=auto"], run_dir)
    assert (run_dir / "final" / "config.json").stat().st_size > 0
