"""Resumable checkpoints (checkpoints/step-N/) and the final Hugging Face model (final/).

A checkpoint holds everything accelerate tracks (model, optimizer, registered objects such as
the LR scheduler, every process's RNG states) plus trainer_state.json with the step and data
position. It is written under a temporary name (step-N.tmp); once every process's files are in
place, manifest.json (each file's path, size and sha256) is written last and the directory is
renamed. A checkpoint counts as complete only with its manifest, so a crash, a full disk or a
file damaged later is detected before anything is resumed from it.

Guarantees on resume: `train.resume=auto` takes the newest checkpoint whose files match their
manifest (sizes, then checksums) and says why it skipped any newer one; checkpoints of an
abandoned future (steps after the one a run resumed from) are set aside as abandoned-step-N,
never deleted; rotation only deletes older checkpoints once the new one is verified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dpo_cli.distributed import sharded
from dpo_cli.errors import NonFiniteError, UserError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
# trainer_state.json's "checkpoint_format": 2 since checkpoints have a manifest. A checkpoint
# without the key was written before, and is accepted without a manifest (no checksums).
FORMAT = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
# Room asked for beyond the estimate: the estimate is the previous checkpoint's size (or the
# tensors' bytes), and the new one may be a little larger (pickled RNG and scheduler state,
# about 15 kB per process, and the files' headers: 0.9% on the tiny model). A fixed 64 MiB
# here asked 16 times a small model's checkpoint; 256 kB covers these for up to 16 processes.
_SPACE_FACTOR, _SPACE_SLACK = 1.1, 256 * 2**10
T = TypeVar("T")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every checkpoints/step-N directory in `root`, complete or not, by step."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir()]
    return sorted(found)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in `run_dir` whose files are all there at their manifest's sizes (or that
    predate manifests), oldest first. Checksums are left to `resolve_resume`: they read it all."""
    return [d for _, d in _step_dirs(checkpoints_dir(run_dir)) if verify(d, checksums=False) is None]


# --- verification ------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state(path: Path) -> dict:
    state = json.loads((path / STATE_FILE).read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("no integer 'step'")
    return state


def is_legacy(path: Path) -> bool:
    """Written before checkpoints had a manifest: trainer_state.json without checkpoint_format."""
    try:
        return not (path / MANIFEST_FILE).exists() and "checkpoint_format" not in _read_state(path)
    except (OSError, ValueError):
        return False


def verify(path: Path, checksums: bool = True) -> str | None:
    """Why checkpoint `path` cannot be resumed from, or None when it can: every file in its
    manifest present at its size (and, with `checksums`, its sha256), trainer_state.json
    readable. A checkpoint from before manifests (`is_legacy`) passes on trainer_state.json."""
    if not path.is_dir():
        return "it is not a directory"
    has_manifest = (path / MANIFEST_FILE).is_file()
    if has_manifest:
        try:
            entries = json.loads((path / MANIFEST_FILE).read_text())["files"]
            problem = _check_files(path, entries, checksums)
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"{MANIFEST_FILE} is unreadable ({type(e).__name__}: {e})"
        if problem:
            return problem
    try:
        state = _read_state(path)
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__}: {e})"
    if not has_manifest and "checkpoint_format" in state:
        return f"{MANIFEST_FILE} is missing (the checkpoint was not finished, or was damaged since)"
    return None


def _check_files(path: Path, entries: list[dict], checksums: bool) -> str | None:
    for e in entries:
        try:
            size = (path / e["path"]).stat().st_size
        except FileNotFoundError:
            return f"{e['path']} is missing"
        if size != e["size"]:
            how = "cut short" if size < e["size"] else "changed since"
            return f"{e['path']} has {size} bytes, its manifest says {e['size']} ({how})"
    for e in entries if checksums else ():
        if _sha256(path / e["path"]) != e["sha256"]:
            return f"{e['path']} does not match its sha256 checksum (its content changed since it was written)"
    return None


def _write_manifest(path: Path) -> None:
    """manifest.json for every file under `path`: written last, it marks the checkpoint complete."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = [{"path": str(p.relative_to(path)), "size": p.stat().st_size, "sha256": _sha256(p)} for p in files]
    with (path / MANIFEST_FILE).open("w") as f:
        json.dump({"files": entries}, f, indent=1)


def _size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _last_good(run_dir: Path) -> str:
    good = complete_checkpoints(run_dir)
    return str(good[-1]) if good else "none (no checkpoint has been saved in this run dir)"


def _alternatives(dirs: list[Path], exclude: Path) -> str:
    """The good checkpoints in `dirs` other than `exclude`, newest first, for an error message."""
    roots = list(dict.fromkeys(d.resolve() for d in dirs))
    good = [d for root in roots for _, d in _step_dirs(root) if verify(d, checksums=False) is None]
    good = [d for d in good if d != exclude.resolve()]
    if not good:
        return f"there is no other good checkpoint in {', '.join(str(d) for d in roots)}"
    return f"good checkpoints: {', '.join(str(d) for d in good[::-1])} (train.resume=auto takes the newest)"


# --- housekeeping: stale temporaries, abandoned futures --------------------------------------


def remove_stale_tmp(run_dir: Path) -> None:
    """Delete step-N.tmp directories: the unfinished saves of a run that was killed."""
    root = checkpoints_dir(run_dir)
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        if _TMP_DIR.match(d.name):
            log.warning("removing %s: an unfinished checkpoint of a run that stopped while saving", d)
            shutil.rmtree(d, ignore_errors=True)


def discard_future(run_dir: Path, step: int) -> list[Path]:
    """Set aside every checkpoint after `step` as checkpoints/abandoned-step-N (never deleted).

    When a run resumes from step S, checkpoints with a later step belong to a future that was
    abandoned (metrics.jsonl is cut back to S): left in place they would outrank the new ones
    in rotation and in train.resume=auto. Returns the new paths."""
    return _set_aside(run_dir, step + 1, f"this run continues from step {step}")


def _set_aside(run_dir: Path, first: int, why: str) -> list[Path]:
    """Rename checkpoints at step `first` and later to abandoned-step-N (-2, -3, ... if taken)."""
    moved = []
    for n, d in _step_dirs(checkpoints_dir(run_dir)):
        if n < first:
            continue
        target = d.with_name(f"abandoned-{d.name}")
        k = 1
        while target.exists():
            k += 1
            target = d.with_name(f"abandoned-{d.name}-{k}")
        try:
            d.rename(target)
        except OSError as e:
            log.warning("could not set aside %s (%s): move it out of %s by hand", d, e, d.parent)
            continue
        log.warning(
            "%s is from an abandoned run (%s): renamed to %s; delete it when you no longer need it",
            d,
            why,
            target.name,
        )
        moved.append(target)
    return moved


# --- processes agreeing ------------------------------------------------------------------------


def _on_main(fn: Callable[[], T]) -> T:
    """`fn()` computed once, on the main process, and its result (or UserError) on every process:
    all of them must pick the same checkpoint, and only one may rename or delete."""
    from dpo_cli.distributed import broadcast_from_main, cpu_only, world_size_from_env

    if world_size_from_env() <= 1:
        return fn()
    from accelerate import PartialState

    outcome: tuple[bool, Any] | None = None
    if PartialState(cpu=cpu_only()).is_main_process:
        try:
            outcome = (True, fn())
        except UserError as e:
            broadcast_from_main((False, str(e)))
            raise
    ok, value = broadcast_from_main(outcome)
    if not ok:
        raise UserError(value)
    return value


def _agree(accelerator: Any, failure: Any) -> Any:
    """The first failure any process met (None if none), on every process; also a barrier. All
    processes then raise together instead of leaving the others waiting in a collective."""
    if accelerator.num_processes == 1:
        return failure
    from accelerate.utils import gather_object

    failures = [f for f in gather_object([failure]) if f is not None]
    return failures[0] if failures else None


# --- save --------------------------------------------------------------------------------------


def save(
    accelerator: Any,
    run_dir: Path,
    step: int,
    state: dict,
    keep: int | None,
    estimate_bytes: int | None = None,
) -> Path:
    """Save the full training state after optimizer step `step`; keep the newest `keep`.

    Every process calls this: each writes its own RNG state, and sharded strategies (FSDP,
    DeepSpeed) gather through collectives inside save_state. Before writing: stale step-N.tmp
    directories go, the free space is checked against `estimate_bytes` (default: the previous
    checkpoint's size, else the model's and optimizer's tensors), and checkpoints at this step
    or later (an abandoned future) are set aside. Rotation runs only once the new one is
    complete and verified. Raises UserError, with the partial step-N.tmp removed, when the disk
    is full or not writable.
    """
    failure = None
    if accelerator.is_main_process:
        try:
            _prepare(accelerator, run_dir, step, estimate_bytes)
        except UserError as e:
            failure = str(e)
    failure = _agree(accelerator, failure)
    if failure:
        raise UserError(failure)
    final = _write(accelerator, run_dir, step, state)
    if accelerator.is_main_process:
        if keep is not None:
            _rotate(run_dir, keep, final)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _prepare(accelerator: Any, run_dir: Path, step: int, estimate_bytes: int | None) -> None:
    root = checkpoints_dir(run_dir)
    remove_stale_tmp(run_dir)
    if estimate_bytes is None:
        good = complete_checkpoints(run_dir)
        estimate_bytes = _size_of(good[-1]) if good else _tensor_bytes(accelerator)
    needed = int(estimate_bytes * _SPACE_FACTOR) + _SPACE_SLACK
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UserError(
            f"not enough free disk space in {root} to write checkpoint step-{step}: needs about "
            f"{_gb(needed)}, {_gb(free)} free; the last good checkpoint is {_last_good(run_dir)}; "
            "free space or set train.keep_checkpoints lower"
        )
    # A checkpoint at this step or later was written by an abandoned future of this run (it
    # resumed from an earlier step): set it aside rather than overwrite it or let it outrank
    # this one in rotation. (`load` with run_dir already did, unless it was not given one.)
    _set_aside(run_dir, step, f"this run is writing step {step} anew")


def _tensor_bytes(accelerator: Any) -> int:
    """What save_state will write, from the tensors: the prepared models' parameters and the
    optimizers' state (AdamW: two tensors per parameter; assumed before the first step)."""
    import torch

    total = 0
    for model in getattr(accelerator, "_models", []):
        total += sum(p.numel() * p.element_size() for p in model.parameters())
    for opt in getattr(accelerator, "_optimizers", []):
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        if state:
            total += sum(v.numel() * v.element_size() for v in state)
        else:
            params = [p for g in opt.param_groups for p in g["params"]]
            total += 2 * sum(p.numel() * p.element_size() for p in params)
    return total


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _write(accelerator: Any, run_dir: Path, step: int, state: dict) -> Path:
    """save_state into step-N.tmp; then, on the main process, trainer_state.json, the manifest
    (last), a size check of every file, and the rename to step-N."""
    final = checkpoints_dir(run_dir) / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    failure = None
    try:
        with _quiet_shared_tensor_warning():
            accelerator.save_state(str(tmp))
    except Exception as e:  # an I/O failure may surface as torch's or safetensors' own error
        failure = _io_failure(e, tmp, accelerator)
    failure = _agree(accelerator, failure)  # every process has written its part
    if failure is None and accelerator.is_main_process:
        try:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "checkpoint_format": FORMAT, **state}, indent=2))
            _write_manifest(tmp)
            problem = verify(tmp, checksums=False)
            if problem:
                raise OSError(errno.EIO, f"the checkpoint did not verify after writing: {problem}")
            tmp.rename(final)
        except Exception as e:  # an OSError, or the verification's
            failure = _io_failure(e, tmp, accelerator)
    failure = _agree(accelerator, failure)
    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        code, text = failure
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            advice = f"make {final.parent} writable or choose another hydra.run.dir"
        else:
            advice = "free space or set train.keep_checkpoints lower"
        raise UserError(
            f"could not write checkpoint step-{step} in {final.parent}: {text}; removed the partial "
            f"{tmp.name}; the last good checkpoint is {_last_good(run_dir)}; {advice}"
        )
    return final


# An I/O failure inside save_state may arrive as torch's or safetensors' own error type.
_IO_HINTS = ("No space left", "Disk quota", "Read-only file system", "Permission denied", "write failed", "IoError")


def _io_failure(e: Exception, tmp: Path, accelerator: Any) -> tuple[int | None, str]:
    """(errno, one line) for an I/O failure while writing; anything else is a bug: re-raised
    after removing the partial checkpoint."""
    if isinstance(e, OSError) or any(h in str(e) for h in _IO_HINTS):
        code = e.errno if isinstance(e, OSError) else (errno.ENOSPC if "No space" in str(e) else None)
        return code, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    raise e


def _rotate(run_dir: Path, keep: int, newest: Path) -> None:
    """Delete good checkpoints beyond the newest `keep` (damaged ones are left for a person to
    look at). `newest`, just written and verified, is the last of them and always stays."""
    good = complete_checkpoints(run_dir)
    assert good and good[-1] == newest, (good, newest)  # discard_future removed any later one
    for old in good[:-keep]:
        try:
            shutil.rmtree(old)
        except OSError as e:  # the new checkpoint is safe; a leftover old one is only space
            log.warning("could not remove old checkpoint %s: %s", old, e)
            continue
        log.info("removed old checkpoint %s (train.keep_checkpoints=%d)", old, keep)


class _SharedTensorWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Removed shared tensor" in message and "while saving" in message)


@contextmanager
def _quiet_shared_tensor_warning() -> Iterator[None]:
    """Drop accelerate's "Removed shared tensor {...} while saving" during save_state, and only it.

    safetensors cannot store two names for one tensor, so accelerate keeps one of each tied
    group and warns. With tied input/output embeddings (the tiny model, most small LMs) that
    is expected and harmless: the model is built tied before load_state, so loading the one
    saved name restores both. Every other message of that logger still passes."""
    logger = logging.getLogger("accelerate.utils.other")
    quiet = _SharedTensorWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


# --- resume ------------------------------------------------------------------------------------


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: None; `auto`, the newest good one in run_dir (damaged or
    incomplete ones are skipped with a warning saying why); or an explicit checkpoint directory,
    which must be good (UserError naming the problem and the good alternatives otherwise).
    Stale step-N.tmp directories are removed first."""
    if resume is None:
        return None

    def decide() -> Path | None:
        remove_stale_tmp(run_dir)
        return _newest_good(run_dir) if resume == "auto" else _explicit(resume, run_dir)

    return _on_main(decide)


def _newest_good(run_dir: Path) -> Path | None:
    found = _step_dirs(checkpoints_dir(run_dir))
    skipped = []
    for _, path in reversed(found):
        problem = verify(path, checksums=True)
        if problem is None:
            _log_legacy(path)
            if skipped:
                log.warning("train.resume=auto: resuming from %s, the newest good checkpoint", path)
            return path
        log.warning("train.resume=auto: skipping damaged checkpoint %s: %s", path, problem)
        skipped.append(path)
    log.warning(
        "train.resume=auto: no %scheckpoint in %s, starting from scratch "
        "(to continue an earlier run, pass its directory as hydra.run.dir)",
        "good " if skipped else "",
        checkpoints_dir(run_dir),
    )
    return None


def _explicit(resume: str, run_dir: Path) -> Path:
    path = Path(resume).expanduser()
    problem = verify(path, checksums=True) if path.exists() else "it does not exist"
    if problem:
        others = _alternatives([path.parent, checkpoints_dir(run_dir)], exclude=path)
        raise UserError(f"train.resume={resume!r} cannot be resumed from: {problem}; {others}")
    _log_legacy(path)
    return path


def _log_legacy(path: Path) -> None:
    if is_legacy(path):
        log.info("%s was written before checkpoints had a manifest: accepted without a checksum check", path)


# Keys that may change between a run and its resume: they decide where things are written or
# how often, not what is computed.
RESUMABLE_CHANGES = (
    "train.resume",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.layout",  # how batches are laid out and scored, not what is computed (exact, see dpo_cli.layout)
    "train.logits_chunk",
    "model.attn_implementation",  # the attention kernel: rounding, not what is computed (its default became null)
    "logger.progress",
    "logger.report",  # whether report.png/report.html are drawn
    "logger.wandb",
    "logger.peak_tflops",  # only what mfu is divided by
    "data.cache_dir",  # where tokenized data is cached, not what it is
    "reference.cache_dir",  # where reference log-probs are cached, not what they are
    "export",  # what final/ holds, written after the last step
    "inspect",
    "eval",  # generation evaluation reads the weights, never changes them (the reference's samples are remade if due)
    "judge",
)


def settings(cfg: Any) -> dict[str, Any]:
    """The resolved config as flat `key: value` pairs, without the keys a resume may change."""
    from omegaconf import OmegaConf

    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if prefix.rstrip(".") in RESUMABLE_CHANGES:
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix.rstrip(".")] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def added_default(key: str, settings: dict[str, Any]) -> Any:
    """The default of a setting that a later version added, or a sentinel when there is none.

    A loss parameter's default is its class's (the `_target_` beside it in `settings`); any
    other key's comes from the config schema. A checkpoint written before the key existed
    computed exactly what that default computes, so resuming with the default is safe.
    """
    import inspect

    from dpo_cli import config

    node, _, name = key.rpartition(".")
    target = settings.get(f"{node}._target_")
    if target is not None:
        try:
            param = inspect.signature(config.import_target(str(target))).parameters.get(name)
        except (ImportError, AttributeError, ValueError):
            param = None
        return param.default if param is not None else _NO_DEFAULT
    return config.schema_default(key, _NO_DEFAULT)


_NO_DEFAULT = object()


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON would store them: a tuple default (AdamW's betas) equals a YAML list."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check_compatible(path: Path, expected: dict) -> None:
    """Refuse to resume from `path` when anything that decides the computation (the config
    apart from RESUMABLE_CHANGES, the run length, the tokenized training data) has changed.
    Keys the checkpoint predates are fine while they keep their defaults (`added_default`);
    keys it has that the config no longer has (removed by a later version) are ignored."""
    state = json.loads((path / STATE_FILE).read_text())
    changed = []
    for k, v in expected.items():
        if k in state:
            if not _same(state[k], v):
                changed.append(f"{k}: {state[k]!r} -> {v!r}")
        elif not _same(default := added_default(k, expected), v):
            was = "no default" if default is _NO_DEFAULT else f"default {default!r}"
            changed.append(f"{k}: absent from the checkpoint ({was}) -> {v!r}")
    if changed:
        raise UserError(
            f"cannot resume from {path}: the run has changed since it was written ({'; '.join(changed)}); "
            "resume with the same settings and data, or start a new run directory"
        )


def load(accelerator: Any, path: Path, run_dir: Path | None = None) -> dict:
    """Restore the state saved by `save` and return its trainer_state.json. With `run_dir`, the
    run continues from this step: checkpoints after it are set aside (`discard_future`).

    A checkpoint that verified but still fails inside accelerate (a file damaged in a way the
    manifest cannot see, or one from before manifests) is a UserError naming it."""
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # SafetensorError, pickle's, torch.load's: all "cannot read it"
        first = str(e).splitlines()[0] if str(e) else ""
        others = _alternatives([path.parent] + ([checkpoints_dir(run_dir)] if run_dir else []), exclude=path)
        raise UserError(
            f"cannot load checkpoint {path}: {type(e).__name__}: {first}; it is damaged or was not "
            f"written by this model and optimizer; {others}"
        ) from e
    state = _read_state(path)
    if run_dir is not None:
        if accelerator.is_main_process:
            discard_future(run_dir, state["step"])
        accelerator.wait_for_everyone()
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


# --- final/ ------------------------------------------------------------------------------------


def _check_finite(state_dict: dict, out_dir: Path, run_dir: Path) -> None:
    """NonFiniteError naming the first tensor holding NaN or inf: final/ must never hold them."""
    import torch

    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"{out_dir} was not written: the trained weights are not finite, {bad[0]} holds NaN or inf{more}; "
            f"the last good checkpoint is {_last_good(run_dir)}"
        )


def save_final(
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    merge_lora: bool = False,
    run_dir: Path | None = None,
) -> None:
    """The trained policy in Hugging Face format, loadable with from_pretrained: the whole
    model, or under LoRA the adapter (adapter_config.json + weights, for peft's
    from_pretrained) and, with `merge_lora`, the merged model in out_dir/merged. An adapter
    over a randomly initialised base also gets that base in out_dir/base, which its
    adapter_config.json names, since no hub id or directory holds it. Call this last: merging
    folds the adapter into the model's weights in place. Non-finite weights are refused
    (NonFiniteError) before anything is written; `run_dir` (default: out_dir's parent) is
    where the message looks for the last good checkpoint.

    Like a checkpoint, final/ is written whole or not at all: the free space is checked first,
    the files go to a temporary directory renamed to `out_dir` when complete, and a failed
    write (a full disk) removes it and raises UserError naming the last good checkpoint and
    how to write final/ from it. A final/ already there (a finished run resumed) is replaced
    only once the new one is complete."""
    run_dir = run_dir if run_dir is not None else out_dir.parent
    state_dict = accelerator.get_state_dict(model)  # gathers sharded weights; every process calls
    # Sharded weights are gathered on the main process only: every process takes its verdict.
    failure = None
    try:
        _check_finite(state_dict, out_dir, run_dir)
    except NonFiniteError as e:
        failure = str(e)
    failure = _agree(accelerator, failure)
    if failure:
        raise NonFiniteError(failure)
    failure = None
    if accelerator.is_main_process:
        tmp = out_dir.with_name(f"{out_dir.name}.tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing it
            _check_final_space(state_dict, out_dir, merge_lora)
            _write_final(accelerator, model, tokenizer, state_dict, tmp, out_dir, merge_lora)
            _replace_dir(tmp, out_dir)
        except Exception as e:  # a full disk surfaces as OSError, or as safetensors' or torch's own error
            shutil.rmtree(tmp, ignore_errors=True)
            if not (isinstance(e, (OSError, UserError)) or any(h in str(e) for h in _IO_HINTS)):
                raise
            failure = f"could not write {out_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    failure = _agree(accelerator, failure)
    if failure:
        raise UserError(
            f"{failure}; nothing of it was kept. The trained run's last good checkpoint is {_last_good(run_dir)}: "
            f"free space, then run the same command with train.resume=auto hydra.run.dir={run_dir} to write final/ "
            "from it (it trains the steps after that checkpoint again, exactly)"
        )
    log.info("saved final %s to %s", "LoRA adapter" if hasattr(accelerator.unwrap_model(model), "peft_config") else
             "model", out_dir)  # fmt: skip
    accelerator.wait_for_everyone()


def _check_final_space(state_dict: dict, out_dir: Path, merge_lora: bool) -> None:
    """UserError (before writing) when final/ cannot fit: its tensors, twice with the merged
    model, plus the tokenizer's files and some slack."""
    import torch

    tensors = sum(v.numel() * v.element_size() for v in state_dict.values() if torch.is_tensor(v))
    needed = int(tensors * (2 if merge_lora else 1) * _SPACE_FACTOR) + _SPACE_SLACK
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UserError(f"not enough free disk space: needs about {_gb(needed)}, {_gb(free)} free")


def _write_final(
    accelerator: Any, model: Any, tokenizer: Any, state_dict: dict, tmp: Path, out_dir: Path, merge_lora: bool
) -> None:
    """final/'s files into `tmp` (to be renamed `out_dir`; paths written into them name `out_dir`)."""
    unwrapped = accelerator.unwrap_model(model)
    adapter = hasattr(unwrapped, "peft_config")
    if adapter:
        _point_adapter_at_base(unwrapped, tokenizer, tmp / "base", out_dir / "base")
    unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if adapter and merge_lora:
        # Sharded weights (FSDP, ZeRO-3) cannot be merged in place: merge the adapter just
        # written into its base, read back from disk.
        merged = merged_from_disk(tmp) if sharded(accelerator) else unwrapped.merge_and_unload()
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
        log.info("saved the merged model (base + adapter) to %s", out_dir / "merged")


def _replace_dir(new: Path, old: Path) -> None:
    """Rename `new` to `old`, replacing a directory there only once `new` is in place."""
    aside = old.with_name(f"{old.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    if old.exists():
        old.rename(aside)
    new.rename(old)
    shutil.rmtree(aside, ignore_errors=True)


def merged_from_disk(adapter_dir: Path) -> Any:
    """The base model with the saved adapter in `adapter_dir` merged in, loaded from disk."""
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype="auto").merge_and_unload()


def _point_adapter_at_base(peft_model: Any, tokenizer: Any, base_dir: Path, named: Path | None = None) -> None:
    """Make the adapter's base_model_name_or_path loadable from anywhere: a local directory
    becomes absolute; a random-init base (no name) is saved to `base_dir` and named `named`
    (default `base_dir`: where it will be once its directory is renamed into place)."""
    import os

    config = peft_model.peft_config["default"]
    name = config.base_model_name_or_path
    if name is not None:
        if os.path.isdir(os.path.expanduser(name)):
            config.base_model_name_or_path = str(Path(name).expanduser().resolve())
        return
    # The base weights without the adapter layers: peft keeps each wrapped layer's own weight
    # as `<layer>.base_layer.<param>`.
    base = peft_model.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    base.save_pretrained(base_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(base_dir)
    config.base_model_name_or_path = str((named or base_dir).resolve())
