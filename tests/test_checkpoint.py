"""Checkpoints: the manifest, verified resume, abandoned futures, rotation, disk space, final/.

Most tests drive `checkpoint` directly with `FakeAccelerator`, which writes a few small files
where accelerate's save_state would write the model, optimizer and RNG states; the end-to-end
ones train the tiny model for a few steps.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUIET, make_config, read_metrics

from dpo_cli import checkpoint
from dpo_cli.config import validate
from dpo_cli.errors import NonFiniteError, UserError

SIZES = {"model.safetensors": 4000, "optimizer.bin": 8000, "random_states_0.pkl": 100}


class FakeAccelerator:
    """The part of accelerate's Accelerator that checkpoint.save and .load use, for one process."""

    is_main_process = True
    num_processes = 1

    def __init__(self, fail: Exception | None = None):
        self.fail = fail  # raised by save_state after it wrote half of its files
        self.saves: list[str] = []
        self.loaded: list[str] = []

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, out: str) -> None:
        self.saves.append(out)
        Path(out).mkdir(parents=True, exist_ok=True)
        for i, (name, size) in enumerate(SIZES.items()):
            if self.fail is not None and i == 1:
                raise self.fail
            (Path(out) / name).write_bytes(os.urandom(size))

    def load_state(self, path: str) -> None:
        self.loaded.append(path)


def save_steps(run_dir: Path, *steps: int, keep: int | None = None) -> list[Path]:
    acc = FakeAccelerator()
    return [checkpoint.save(acc, run_dir, s, {"epoch": 0}, keep) for s in steps]


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# --- the manifest --------------------------------------------------------------------------------


def test_save_writes_a_manifest_of_every_file_last(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    write_manifest = checkpoint.store._write_manifest

    def checked(path: Path) -> None:
        # Last: every process's files and trainer_state.json are in place, and the rename waits.
        assert sorted(p.name for p in path.iterdir()) == sorted([*SIZES, "trainer_state.json"])
        assert path.name == "step-2.tmp" and not (path.parent / "step-2").exists()
        write_manifest(path)

    monkeypatch.setattr(checkpoint.store, "_write_manifest", checked)
    (path,) = save_steps(run_dir, 2)

    manifest = json.loads((path / "manifest.json").read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    assert sorted(listed) == sorted([*SIZES, "trainer_state.json"])
    for name, e in listed.items():
        data = (path / name).read_bytes()
        assert e["size"] == len(data)
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
    assert names(run_dir) == ["step-2"]  # no step-2.tmp left
    assert json.loads((path / "trainer_state.json").read_text())["checkpoint_format"] == checkpoint.FORMAT


def _cut_short(p: Path) -> None:
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[:100])


def _flip_a_byte(p: Path) -> None:
    data = bytearray((p / "model.safetensors").read_bytes())
    data[10] ^= 0xFF
    (p / "model.safetensors").write_bytes(bytes(data))


# How a checkpoint gets damaged, what resume=auto says about it, and whether the sizes alone show it.
DAMAGE = {
    "cut short": (_cut_short, "model.safetensors has 100 bytes, its manifest says 4000 (cut short)", True),
    "missing file": (lambda p: (p / "optimizer.bin").unlink(), "optimizer.bin is missing", True),
    "missing manifest": (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing", True),
    "unreadable manifest": (lambda p: (p / "manifest.json").write_text("{"), "manifest.json is unreadable", True),
    "unreadable state": (lambda p: (p / "trainer_state.json").write_text("{"), "trainer_state.json has 1 bytes", True),
    "same size, other bytes": (_flip_a_byte, "model.safetensors does not match its sha256 checksum", False),
}


@pytest.mark.parametrize(("damage", "reason", "by_size"), DAMAGE.values(), ids=DAMAGE.keys())
def test_auto_skips_a_damaged_checkpoint_for_the_previous_good_one(tmp_path, caplog, damage, reason, by_size):
    run_dir = tmp_path / "run"
    step2, step4 = save_steps(run_dir, 2, 4)
    damage(step4)

    with caplog.at_level(logging.WARNING, logger="dpo_cli.checkpoint"):
        assert checkpoint.resolve_resume("auto", run_dir) == step2
    assert f"skipping damaged checkpoint {step4}: {reason}" in caplog.text
    assert checkpoint.complete_checkpoints(run_dir) == ([step2] if by_size else [step2, step4])


def test_auto_with_every_checkpoint_damaged_starts_from_scratch(tmp_path, caplog):
    run_dir = tmp_path / "run"
    (step2,) = save_steps(run_dir, 2)
    _cut_short(step2)
    with caplog.at_level(logging.WARNING, logger="dpo_cli.checkpoint"):
        assert checkpoint.resolve_resume("auto", run_dir) is None
    assert "no good checkpoint" in caplog.text and "cut short" in caplog.text


def test_an_explicit_damaged_checkpoint_names_the_problem_and_the_good_ones(tmp_path):
    run_dir = tmp_path / "run"
    step2, step4, step6 = save_steps(run_dir, 2, 4, 6)
    _cut_short(step4)
    with pytest.raises(UserError, match=r"step-4'? cannot be resumed from: model.safetensors has 100 bytes") as e:
        checkpoint.resolve_resume(str(step4), run_dir)
    assert f"good checkpoints: {step6}, {step2}" in str(e.value)
    with pytest.raises(UserError, match="it does not exist"):
        checkpoint.resolve_resume(str(tmp_path / "nowhere"), run_dir)
    assert checkpoint.resolve_resume(str(step2), run_dir) == step2


def legacy_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint as written before manifests: trainer_state.json without checkpoint_format."""
    path = root / f"step-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * 10)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_a_checkpoint_from_before_manifests_is_accepted_without_checksums(tmp_path, caplog):
    run_dir = tmp_path / "run"
    old = legacy_checkpoint(run_dir / "checkpoints", 3)
    unreadable = legacy_checkpoint(run_dir / "checkpoints", 5)
    (unreadable / "trainer_state.json").write_text('{"step": 5, "ep')
    with caplog.at_level(logging.INFO, logger="dpo_cli.checkpoint"):
        assert checkpoint.resolve_resume("auto", run_dir) == old
    assert f"{old} was written before checkpoints had a manifest: accepted without a checksum check" in caplog.text
    assert f"skipping damaged checkpoint {unreadable}: trainer_state.json is unreadable" in caplog.text
    assert checkpoint.complete_checkpoints(run_dir) == [old]


def test_a_load_that_fails_inside_accelerate_is_a_user_error_naming_the_checkpoint(tmp_path):
    from safetensors import SafetensorError

    run_dir = tmp_path / "run"
    step2, step4 = save_steps(run_dir, 2, 4)
    acc = FakeAccelerator()

    def load_state(path: str) -> None:
        raise SafetensorError("Error while deserializing header: unexpected pos")

    acc.load_state = load_state
    with pytest.raises(UserError, match=f"cannot load checkpoint {step4}: SafetensorError: .*unexpected pos") as e:
        checkpoint.load(acc, step4, run_dir)
    assert f"good checkpoints: {step2}" in str(e.value)


# --- abandoned futures and rotation --------------------------------------------------------------


def test_resuming_from_an_older_checkpoint_sets_its_future_aside(tmp_path, caplog):
    run_dir = tmp_path / "run"
    step2, *_ = save_steps(run_dir, 2, 4, 6)
    (run_dir / "checkpoints" / "abandoned-step-6").mkdir()  # an earlier abandoned future

    with caplog.at_level(logging.WARNING, logger="dpo_cli.checkpoint"):
        state = checkpoint.load(FakeAccelerator(), step2, run_dir)
    assert state["step"] == 2
    assert names(run_dir) == ["abandoned-step-4", "abandoned-step-6", "abandoned-step-6-2", "step-2"]
    assert (
        "step-6 is from an abandoned run (this run continues from step 2): renamed to abandoned-step-6-2" in caplog.text
    )
    assert checkpoint.resolve_resume("auto", run_dir) == step2


def test_saving_behind_an_abandoned_future_keeps_the_new_checkpoint(tmp_path, caplog):
    """The defect: resumed from step 2 while step-4 and step-6 of an abandoned run exist,
    rotation with keep_checkpoints=1 kept step-6 and deleted the step-4 just written. Saving
    sets that future aside even when train.py did not pass run_dir to `load`."""
    run_dir = tmp_path / "run"
    save_steps(run_dir, 2, 4, 6)
    with caplog.at_level(logging.WARNING, logger="dpo_cli.checkpoint"):
        (step4,) = save_steps(run_dir, 4, keep=1)
    assert names(run_dir) == ["abandoned-step-4", "abandoned-step-6", "step-4"]
    assert "step-4 is from an abandoned run (this run is writing step 4 anew)" in caplog.text
    assert checkpoint.resolve_resume("auto", run_dir) == step4


def test_rotation_keeps_the_newest_good_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    save_steps(run_dir, 2, 4, 6, 8, keep=2)
    assert names(run_dir) == ["step-6", "step-8"]


def test_stale_tmp_directories_are_removed_on_resume_and_on_save(tmp_path, caplog):
    run_dir = tmp_path / "run"
    for stale in ("step-8.tmp", "step-10.tmp"):
        (run_dir / "checkpoints" / stale).mkdir(parents=True)
        (run_dir / "checkpoints" / stale / "model.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="dpo_cli.checkpoint"):
        assert checkpoint.resolve_resume("auto", run_dir) is None
    assert not (run_dir / "checkpoints").exists() or names(run_dir) == []
    assert "step-8.tmp: an unfinished checkpoint of a run that stopped while saving" in caplog.text

    (run_dir / "checkpoints" / "step-3.tmp").mkdir(parents=True)
    save_steps(run_dir, 2)
    assert names(run_dir) == ["step-2"]


# --- disk space and write failures ---------------------------------------------------------------


def fake_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(checkpoint.store.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, free))


def test_save_refuses_before_writing_when_the_disk_is_too_full(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (step2,) = save_steps(run_dir, 2)
    fake_disk(monkeypatch, free=10**5)
    acc = FakeAccelerator()
    with pytest.raises(UserError) as e:
        checkpoint.save(acc, run_dir, 4, {}, keep=2)
    assert str(e.value) == (
        f"not enough free disk space in {run_dir / 'checkpoints'} to write checkpoint step-4: needs about "
        f"0.3 MB, 0.1 MB free; the last good checkpoint is {step2}; free space or set train.keep_checkpoints lower"
    )
    assert acc.saves == [] and names(run_dir) == ["step-2"]


def test_the_space_estimate_is_the_previous_checkpoint_or_the_tensors(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    previous = legacy_checkpoint(run_dir / "checkpoints", 2)
    os.truncate(previous / "model.safetensors", 5 * 10**9)  # sparse: 5 GB on paper
    fake_disk(monkeypatch, free=3 * 10**9)
    with pytest.raises(UserError, match="needs about 5.50 GB, 3.00 GB free"):
        checkpoint.save(FakeAccelerator(), run_dir, 4, {}, keep=2)
    with pytest.raises(UserError, match="needs about 11.00 GB"):
        checkpoint.save(FakeAccelerator(), tmp_path / "other", 4, {}, keep=2, estimate_bytes=10**10)

    # No checkpoint yet: the model's parameters plus AdamW's two state tensors per parameter.
    model = torch.nn.Linear(100, 10)
    optimizer = torch.optim.AdamW(model.parameters())
    acc = FakeAccelerator()
    acc._models, acc._optimizers = [model], [optimizer]
    assert checkpoint.store._tensor_bytes(acc) == 3 * 1010 * 4
    model(torch.ones(1, 100)).sum().backward()
    optimizer.step()
    assert checkpoint.store._tensor_bytes(acc) == 3 * 1010 * 4 + 2 * 4  # plus a step counter per parameter


@pytest.mark.integration
def test_the_space_asked_for_is_close_to_a_real_checkpoints_size(train_run, tmp_path, monkeypatch):
    """Measured on the tiny model: the space a save asks for is at least the checkpoint's real
    size (a disk just too small is refused before writing) and at most 1.25 times it (it asked
    for 16 times, a fixed 64 MiB on top, refusing disks with room to spare)."""
    args = ["train.max_steps=2", "train.save_every=1", "train.eval_every=null", "train.keep_checkpoints=null"]
    _, measured = train_run(args, tmp_path / "measured")
    real = max(checkpoint.store._size_of(p) for p in checkpoint.complete_checkpoints(measured))
    # Both estimates: step 1's from the tensors, step 2's from step 1's size.
    fake_disk(monkeypatch, free=int(1.25 * real))
    _, roomy = train_run(args, tmp_path / "roomy")
    assert [p.name for p in checkpoint.complete_checkpoints(roomy)] == ["step-1", "step-2"]
    fake_disk(monkeypatch, free=real - 1)
    with pytest.raises(UserError, match="not enough free disk space .* to write checkpoint step-1"):
        train_run(args, tmp_path / "tight")


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "free space or set train.keep_checkpoints lower"),
        (OSError(errno.EROFS, "Read-only file system"), "writable or choose another hydra.run.dir"),
        (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "free space"),
    ],
    ids=["ENOSPC", "EROFS", "torch"],
)
def test_a_failed_write_removes_the_partial_checkpoint_and_keeps_the_old_ones(tmp_path, error, advice):
    run_dir = tmp_path / "run"
    (step2,) = save_steps(run_dir, 2)
    with pytest.raises(UserError, match="could not write checkpoint step-4 in .*checkpoints: ") as e:
        checkpoint.save(FakeAccelerator(fail=error), run_dir, 4, {}, keep=1)
    assert str(error).split(":")[0] in str(e.value)
    assert f"removed the partial step-4.tmp; the last good checkpoint is {step2}; " in str(e.value)
    assert advice in str(e.value)
    assert names(run_dir) == ["step-2"]  # rotation did not run


def test_a_failed_manifest_write_is_a_user_error_too(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    save_steps(run_dir, 2)

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "manifest.json"))

    monkeypatch.setattr(checkpoint.store, "_write_manifest", full)
    with pytest.raises(UserError, match=r"No space left on device.*removed the partial step-4.tmp"):
        save_steps(run_dir, 4, keep=1)
    assert names(run_dir) == ["step-2"]


def test_a_bug_while_writing_is_not_disguised_but_cleans_up(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="a bug"):
        checkpoint.save(FakeAccelerator(fail=ValueError("a bug")), run_dir, 2, {}, keep=1)
    assert names(run_dir) == []


# --- the tied-weights warning ----------------------------------------------------------------------


def test_only_the_shared_tensor_warning_is_silenced_and_only_while_saving(caplog):
    from accelerate import PartialState
    from accelerate.logging import get_logger

    PartialState(cpu=True)  # accelerate's logger needs it, as in a run
    logger = get_logger("accelerate.utils.other")  # where accelerate warns, through its adapter
    tied = "Removed shared tensor {'lm_head.weight'} while saving. This should be OK, but check ..."
    with caplog.at_level(logging.WARNING):
        with checkpoint.store._quiet_shared_tensor_warning():
            logger.warning(tied)
            logger.warning("another warning")
        logger.warning(tied)
    messages = [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records]
    assert messages == ["another warning", tied]


# --- resume compatibility ------------------------------------------------------------------------


def shape_of(overrides: list[str]) -> dict:
    return {"n_steps": 4, "data": "abc", **checkpoint.settings(validate(make_config(QUIET + overrides)))}


def written_with(tmp_path: Path, shape: dict) -> Path:
    path = tmp_path / "step-2"
    path.mkdir(exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": 2, **shape}))
    return path


def test_a_key_the_checkpoint_predates_resumes_while_it_keeps_its_default(tmp_path):
    now = shape_of([])
    old = {k: v for k, v in now.items() if k not in ("loss.label_smoothing", "train.max_grad_norm", "optimizer.betas")}
    checkpoint.check_compatible(written_with(tmp_path, old), now)  # passes

    changed = shape_of(["loss.label_smoothing=0.1"])
    with pytest.raises(UserError, match=r"loss.label_smoothing: absent from the checkpoint \(default 0.0\) -> 0.1"):
        checkpoint.check_compatible(written_with(tmp_path, old), changed)
    with pytest.raises(UserError, match=r"train.max_grad_norm: absent from the checkpoint \(default 1.0\) -> 0.5"):
        checkpoint.check_compatible(written_with(tmp_path, old), shape_of(["train.max_grad_norm=0.5"]))


def test_a_key_a_later_version_removed_does_not_refuse_the_resume(tmp_path):
    now = shape_of([])
    old = {**now, "train.some_removed_option": 7, "loss.gone": "x"}
    checkpoint.check_compatible(written_with(tmp_path, old), now)
    with pytest.raises(UserError, match="optimizer.lr: 0.001 -> 0.05"):
        checkpoint.check_compatible(written_with(tmp_path, old), shape_of(["optimizer.lr=0.05"]))


# --- final/ --------------------------------------------------------------------------------------


def test_save_final_refuses_non_finite_weights(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dpo_cli.modeling import load_model, load_tokenizer

    cfg = make_config([])
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer, cfg.train.seed)
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    good = legacy_checkpoint(tmp_path / "checkpoints", 6)
    first, second = list(model.state_dict())[1:3]
    with torch.no_grad():
        model.get_parameter(second).fill_(float("inf"))
        model.get_parameter(first)[0, 0] = float("nan")

    with pytest.raises(NonFiniteError) as e:
        checkpoint.save_final(accelerator, model, tokenizer, tmp_path / "final")
    assert str(e.value) == (
        f"{tmp_path / 'final'} was not written: the trained weights are not finite, {first} holds NaN or inf "
        f"(and 1 more tensors); the last good checkpoint is {good}"
    )
    assert not (tmp_path / "final").exists()


# --- end to end on the tiny model ----------------------------------------------------------------

ARGS = ["train.max_steps=3", "train.save_every=1"]


class Stop(Exception):
    """Stands for a run killed right after it saved a checkpoint."""


@pytest.mark.integration
def test_a_run_resumed_from_an_older_checkpoint_outranks_its_abandoned_future(train_run, tmp_path, monkeypatch, caplog):
    _, run_dir = train_run([*ARGS, "train.keep_checkpoints=null"], tmp_path / "r")
    assert names(run_dir) == ["step-1", "step-2", "step-3"]
    assert "Removed shared tensor" not in caplog.text  # the tiny model ties its embeddings

    save = checkpoint.save

    def save_then_stop(*args, **kwargs):
        path = save(*args, **kwargs)
        if path.name == "step-2":
            raise Stop
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    older = run_dir / "checkpoints" / "step-1"
    with pytest.raises(Stop):
        train_run([*ARGS, "train.keep_checkpoints=1", f"train.resume={older}"], run_dir)
    # The new step-2 is kept; the old run's step-2 and step-3 are set aside, not deleted, not resumed.
    assert names(run_dir) == ["abandoned-step-2", "abandoned-step-3", "step-2"]
    assert checkpoint.resolve_resume("auto", run_dir) == run_dir / "checkpoints" / "step-2"
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]


@pytest.mark.integration
def test_an_old_checkpoint_resumes_and_a_broken_one_is_a_user_error(train_run, tmp_path):
    """Checkpoints from before manifests and before a setting existed (at its default) resume;
    one that accelerate cannot load is a UserError naming it, not a traceback."""
    _, run_dir = train_run(["train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=null"], tmp_path / "r")
    for step in (1, 2):  # as an earlier version wrote them
        path = run_dir / "checkpoints" / f"step-{step}"
        (path / "manifest.json").unlink(missing_ok=True)
        state = json.loads((path / "trainer_state.json").read_text())
        state.pop("checkpoint_format", None)
        del state["loss.label_smoothing"]
        (path / "trainer_state.json").write_text(json.dumps(state))
    broken = run_dir / "checkpoints" / "step-2"
    with (broken / "model.safetensors").open("r+b") as f:
        f.truncate(1000)  # no manifest to tell: only accelerate finds out

    args = ["train.max_steps=2", "train.save_every=1", "train.resume=auto"]
    with pytest.raises(
        UserError, match=f"cannot load checkpoint {broken}: .*good checkpoints: {broken.parent / 'step-1'}"
    ):
        train_run(args, run_dir)
    shutil.rmtree(broken)
    train_run(args, run_dir)  # from step 1, which lacks loss.label_smoothing (now at its default)
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]
    assert (broken / "manifest.json").is_file()
