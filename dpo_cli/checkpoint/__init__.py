"""Resumable checkpoints (checkpoints/step-N/) and the final Hugging Face model (final/).

Four parts, lowest first:
- `store`: a checkpoint written whole or not at all (a temporary name, manifest.json with every
  file's size and sha256 written last, then the rename), verified, rotated;
- `resume`: which checkpoint a run continues from (`train.resume=auto`: the newest good one),
  loading it, and setting aside the checkpoints of an abandoned future (never deleted);
- `compat`: whether the config may resume a checkpoint (what decides the computation is unchanged);
- `export`: final/, the trained policy in Hugging Face format, written whole or not at all.

The names below are the package's interface: `checkpoint.save(...)`, `checkpoint.load(...)`.
"""

from dpo_cli.checkpoint.compat import RESUMABLE_CHANGES, added_default, check_compatible, settings
from dpo_cli.checkpoint.export import merged_from_disk, save_final
from dpo_cli.checkpoint.resume import discard_future, load, resolve_resume
from dpo_cli.checkpoint.store import (
    FORMAT,
    MANIFEST_FILE,
    STATE_FILE,
    checkpoints_dir,
    complete_checkpoints,
    is_legacy,
    remove_stale_tmp,
    save,
    verify,
)

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "RESUMABLE_CHANGES",
    "STATE_FILE",
    "added_default",
    "check_compatible",
    "checkpoints_dir",
    "complete_checkpoints",
    "discard_future",
    "is_legacy",
    "load",
    "merged_from_disk",
    "remove_stale_tmp",
    "resolve_resume",
    "save",
    "save_final",
    "settings",
    "verify",
]
