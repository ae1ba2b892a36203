"""Reference log-probs computed once before training (`reference.precompute`), kept in an
on-disk cache (`reference.cache_dir`) that later runs and the jobs of a sweep share.

An entry holds, for every train and eval example, the reference's summed response log-probs,
response token counts and LD-DPO's shared-prefix log-probs. Its file name is a fingerprint of
everything that decides those numbers:

- the reference weights: a content hash of the model's files (config, weights), or, for a
  randomly initialised model, its architecture, the seed and the tokenizer size; when the
  reference is a warm-started initial policy (`model.warm_start`), a content hash of its
  weights in memory after the warm start (under LoRA the base weights, without the adapter);
- the data as token ids (so the tokenizer, the chat template and the length settings), train
  and eval, in order;
- the reference dtype, the attention implementation, mixed precision, the device type and the
  torch and transformers versions.

What does not change them (beta, the loss, optimizer.lr, the number of steps, the training
seed of a pretrained model without a warm start) keeps the key, so a second run reads the
entry without loading the reference model. An entry is written under a temporary name and
renamed when complete, and carries a checksum of its values: a run killed while writing, or a
file cut short, leaves nothing a later run would trust (it is reported and recomputed).

Several processes share the work: each computes its strided share of the examples, one
all-reduce assembles the tables on every process, and the main process writes the one file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from dpo_cli.batch import ROLE_NAMES
from dpo_cli.data.batching import eval_batches
from dpo_cli.data.collate import collate
from dpo_cli.data.tokenize import Tokenized, fingerprint
from dpo_cli.distributed import in_lockstep
from dpo_cli.errors import ModelLoadError
from dpo_cli.hub import hub_reachable, looks_like_path
from dpo_cli.lmhead import Head
from dpo_cli.logprobs import CHOSEN, REJECTED, SHARED
from dpo_cli.lora import base_state_dict
from dpo_cli.modeling.options import ModelConfig
from dpo_cli.reference import (
    ModelReference,
    PrecomputedReference,
    live_reference,
    place_reference,
    reference_model_config,
    release,
)
from dpo_cli.schema import Config, as_plain

log = logging.getLogger(__name__)

FORMAT = 1
COLUMNS = ("logps", "tokens", "shared")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
Tables = dict[str, torch.Tensor]


def _file_sha256(path: Path, memo: dict[str, Any]) -> str:
    """sha256 of a file's content, memoized by (path, size, mtime) so that a model's weights
    are read once per cache, not once per run."""
    st = path.stat()
    key = str(path.resolve())
    seen = memo.get(key)
    if seen and seen["size"] == st.st_size and seen["mtime_ns"] == st.st_mtime_ns:
        return seen["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    memo[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    return memo[key]["sha256"]


def _model_dir(name: str, revision: str | None) -> Path:
    """The local directory holding model `name`: itself, or its snapshot in the Hub cache."""
    if looks_like_path(name):
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                allow_patterns=["*.json", *(f"*{s}" for s in WEIGHT_SUFFIXES)],
                local_files_only=not hub_reachable(),
            )
        )
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds for "not available"
        raise ModelLoadError(
            f"could not find model {name!r} to fingerprint its reference log-probs: {e}; "
            "download it (`hf download NAME --local-dir DIR`) and pass DIR"
        ) from None


def weights_digest(section: ModelConfig, memo: dict[str, Any]) -> str:
    """A content hash of the files that make a pretrained model: config.json and its weights
    (only `gguf_file` when the model loads from one)."""
    root = _model_dir(section.name_or_path, section.revision)
    if section.gguf_file:
        files = [root / section.gguf_file]
    else:
        files = [root / "config.json"] + sorted(
            p for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
        )
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ModelLoadError(f"model files not found: {', '.join(missing)}")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{_file_sha256(p, memo)}\n".encode())
    return h.hexdigest()


def tensors_digest(model: torch.nn.Module) -> str:
    """A content hash of `model`'s weights as they are in memory: each tensor's name, dtype,
    shape and bytes, in name order. Of a LoRA (peft) model, the base weights only, under the
    base model's own names: with the adapter off they are the reference, whatever the
    adapter's settings or values."""
    tensors = base_state_dict(model) if hasattr(model, "get_base_model") else model.state_dict()
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def _source(cfg: Config, tokenizer: Any, policy: torch.nn.Module, memo: dict) -> dict[str, Any]:
    """What the reference's weights are: a separate model's files, or, when the reference is
    the initial policy, that policy's weights after the warm start (hashed in memory: they
    follow from the warm start's settings, the seed, the data and, where a run directory
    keeps them, its warm_start/), else where they were loaded from: the files of a pretrained
    model, or a random initialisation's architecture, seed and vocabulary."""
    if cfg.reference.name_or_path:
        return {"weights": weights_digest(reference_model_config(cfg), memo)}
    if cfg.model.warm_start.steps:
        return {"warm_started": tensors_digest(policy)}
    if cfg.model.name_or_path is not None:
        return {"weights": weights_digest(cfg.model, memo)}
    return {
        "random_init": as_plain(cfg.model.random_init),
        "seed": cfg.train.seed,
        "vocab": len(tokenizer),
        "special": [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id],
    }


def _quantized_reference(cfg: Config) -> bool:
    """Whether the reference is the quantized base (its log-probs differ from the unquantized
    model's); only then does the key name the quantization, so other runs' keys stay as they were."""
    return cfg.model.quantization.bits is not None and not cfg.reference.name_or_path


def entry_key(
    cfg: Config,
    tokenizer: Any,
    policy: torch.nn.Module,
    train_set: list[Tokenized],
    eval_set: list[Tokenized],
    device: str,
    memo: dict,
) -> tuple[str, dict[str, Any]]:
    """The cache key of this run's reference log-probs, and what it was made of. `policy` is
    the initial policy (warm-started, LoRA-wrapped under LoRA), before any update."""
    import transformers

    parts = {
        "format": FORMAT,
        "source": _source(cfg, tokenizer, policy, memo),
        "dtype": cfg.reference.dtype or cfg.model.dtype,
        "attn_implementation": cfg.model.attn_implementation,
        "mixed_precision": cfg.train.mixed_precision,
        "device": device,
        **({"quantization": dataclasses.asdict(cfg.model.quantization)} if _quantized_reference(cfg) else {}),
        "train": [len(train_set), fingerprint(train_set)],
        "eval": [len(eval_set), fingerprint(eval_set)],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24], parts


def _checksum(tables: dict[str, Tables]) -> str:
    h = hashlib.sha256()
    for split in sorted(tables):
        for name in COLUMNS:
            h.update(tables[split][name].contiguous().numpy().tobytes())
    return h.hexdigest()


def load_entry(path: Path, key: str, sizes: dict[str, int]) -> dict[str, Any] | None:
    """The entry at `path` if it is complete and belongs to `key`; None (and why, logged)
    otherwise."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        tables = entry["tables"]
        problem = None
        if entry.get("format") != FORMAT or entry.get("key") != key:
            problem = "it was written for another key or format"
        elif any(tables[s][c].shape != (n, 2) for s, n in sizes.items() for c in COLUMNS):
            problem = "its tables do not have one row per example"
        elif _checksum(tables) != entry.get("checksum"):
            problem = "its checksum does not match its values"
    except Exception as e:  # noqa: BLE001 - a file cut short or overwritten fails in many ways
        problem = f"it cannot be read ({type(e).__name__}: {str(e)[:200]})"
    if problem:
        log.warning("reference cache entry %s is damaged: %s; recomputing it", path, problem)
        return None
    return entry


def save_entry(path: Path, key: str, tables: dict[str, Tables], meta: dict[str, Any]) -> None:
    """Write the entry under a temporary name, then rename it: readers see all of it or none."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    entry = {"format": FORMAT, "key": key, "tables": tables, "checksum": _checksum(tables), "meta": json.dumps(meta)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(entry, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning(
            "could not write the reference cache entry %s (%s); set reference.cache_dir to a writable directory",
            path,
            e,
        )


def compute_tables(
    reference: Any, dataset: list[Tokenized], pad_id: int, micro: int, accelerator: Any, layout: str = "padded"
) -> Tables:
    """The reference's per-example values over `dataset`, each process computing its strided
    share (in batches of `layout`); one sum over processes assembles them everywhere."""
    n = len(dataset)
    out = torch.zeros(len(COLUMNS), n, 2)
    batches = eval_batches(n, accelerator.process_index, accelerator.num_processes, micro)
    for idx, weight in in_lockstep(batches, accelerator, fill=[0]):
        batch = collate([dataset[i] for i in idx], pad_id, index=idx, layout=layout)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            lp = reference(batch, frozenset({SHARED}))
        if not weight:  # a forward only to keep sharded processes in step
            continue
        for column, role in ((CHOSEN, CHOSEN), (REJECTED, REJECTED)):
            v = lp[ROLE_NAMES[role]]
            values = (v.logps, v.tokens, v.shared)
            rows = batch["index"][batch["role"] == role].cpu()
            for c, v in enumerate(values):
                out[c, rows, column] = v.detach().float().cpu()
    if accelerator.num_processes > 1:
        out = accelerator.reduce(out.to(accelerator.device), "sum").cpu()
    return {name: out[c].clone() for c, name in enumerate(COLUMNS)}


def _memo(cache_dir: Path | None) -> tuple[dict[str, Any], Path | None]:
    path = cache_dir / "file-digests.json" if cache_dir else None
    try:
        return (json.loads(path.read_text()) if path and path.is_file() else {}), path
    except (OSError, ValueError):
        return {}, path


def _save_memo(memo: dict[str, Any], path: Path | None) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:
        pass  # only a speed-up: the next run hashes the files again


def precompute(
    cfg: Config,
    tokenizer: Any,
    policy: torch.nn.Module,
    datasets: dict[str, list[Tokenized]],
    accelerator: Any,
    layout: str = "padded",
    head: Head | None = None,
) -> dict[str, PrecomputedReference]:
    """Reference log-probs of every dataset in `datasets` (train, eval), from the cache when
    an entry for this key exists, else computed (then the reference model is freed) and
    written to the cache. `policy` is the initial, unwrapped policy; `layout` and `head` are
    the run's (they change how, not what, is computed)."""
    from accelerate.utils import broadcast_object_list

    cache_dir = Path(cfg.reference.cache_dir).expanduser() if cfg.reference.cache_dir else None
    memo, memo_path = _memo(cache_dir)
    key, parts = entry_key(cfg, tokenizer, policy, datasets["train"], datasets["eval"], accelerator.device.type, memo)
    path = cache_dir / f"{key}.pt" if cache_dir else None
    sizes = {split: len(d) for split, d in datasets.items()}
    started = time.perf_counter()
    entry = None
    if accelerator.is_main_process:
        _save_memo(memo, memo_path)
        entry = load_entry(path, key, sizes) if path else None
    if accelerator.num_processes > 1:  # every process takes the same branch
        entry = broadcast_object_list([entry])[0]
    if entry is not None:
        seconds = json.loads(entry["meta"])["seconds"]
        took = time.perf_counter() - started
        log.info(
            "reference log-probs: cache hit %s; read in %.1f s instead of %.1f s of reference forwards "
            "(saved %.1f s); no reference model loaded",
            path,
            took,
            seconds,
            seconds - took,
        )
        tables = entry["tables"]
    else:
        reference = live_reference(cfg, tokenizer, policy, copy_policy=False, head=head)
        if isinstance(reference, ModelReference):  # a separate model (or a copy in another dtype)
            reference.model = place_reference(reference.model, accelerator, cfg.train)
        log.info("reference log-probs: computing them once with %s", reference.describe())
        tables = {
            split: compute_tables(reference, d, tokenizer.pad_token_id, cfg.train.micro_batch_size, accelerator, layout)
            for split, d in datasets.items()
        }
        release(reference)
        seconds = time.perf_counter() - started
        if accelerator.is_main_process and path is not None:
            save_entry(path, key, tables, {"seconds": seconds, "key": parts})
        log.info(
            "reference log-probs: computed for %s examples in %.1f s%s",
            " + ".join(f"{n} {s}" for s, n in sizes.items()),
            seconds,
            f"; cached in {path}" if path else " (reference.cache_dir=null: not cached)",
        )
    what = f"precomputed log-probs ({path if path else 'in memory'}); no reference model in memory"
    return {split: PrecomputedReference(tables[split], what) for split in datasets}
