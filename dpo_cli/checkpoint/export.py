"""The trained policy in Hugging Face format (final/): the whole model, or a LoRA adapter with
its base and, when asked, the merged model; written whole or not at all, like a checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dpo_cli.checkpoint.store import IO_HINTS, SPACE_FACTOR, SPACE_SLACK, gb, last_good
from dpo_cli.distributed import first_failure, sharded
from dpo_cli.errors import NonFiniteError, UserError
from dpo_cli.lora import base_state_dict
from dpo_cli.modeling.quantize import is_quantized, merged_dequantized

log = logging.getLogger(__package__)  # lines name the package (as before its split into modules)


def _check_finite(state_dict: dict, out_dir: Path, run_dir: Path) -> None:
    """NonFiniteError naming the first tensor holding NaN or inf: final/ must never hold them."""
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"{out_dir} was not written: the trained weights are not finite, {bad[0]} holds NaN or inf{more}; "
            f"the last good checkpoint is {last_good(run_dir)}"
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
    failure = first_failure(accelerator, failure)
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
            if not (isinstance(e, (OSError, UserError)) or any(h in str(e) for h in IO_HINTS)):
                raise
            failure = f"could not write {out_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    failure = first_failure(accelerator, failure)
    if failure:
        raise UserError(
            f"{failure}; nothing of it was kept. The trained run's last good checkpoint is {last_good(run_dir)}: "
            f"free space, then run the same command with train.resume=auto hydra.run.dir={run_dir} to write final/ "
            "from it (it trains the steps after that checkpoint again, exactly)"
        )
    log.info("saved final %s to %s", "LoRA adapter" if hasattr(accelerator.unwrap_model(model), "peft_config") else
             "model", out_dir)  # fmt: skip
    accelerator.wait_for_everyone()


def _check_final_space(state_dict: dict, out_dir: Path, merge_lora: bool) -> None:
    """UserError (before writing) when final/ cannot fit: its tensors, twice with the merged
    model, plus the tokenizer's files and some slack."""
    tensors = sum(v.numel() * v.element_size() for v in state_dict.values() if torch.is_tensor(v))
    needed = int(tensors * (2 if merge_lora else 1) * SPACE_FACTOR) + SPACE_SLACK
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UserError(f"not enough free disk space: needs about {gb(needed)}, {gb(free)} free")


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
        # written into its base, read back from disk. Quantized ones are dequantized first.
        if is_quantized(unwrapped):  # a plain model, dequantized (quantize.merged_dequantized)
            merged = merged_dequantized(unwrapped, tmp)
        elif sharded(accelerator):
            merged = merged_from_disk(tmp)
        else:
            merged = unwrapped.merge_and_unload()
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
    # here: peft is a heavy import, for LoRA runs only
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftConfig

    classifier = PeftConfig.from_pretrained(adapter_dir).task_type == "SEQ_CLS"  # a reward model (task=reward)
    auto = AutoPeftModelForSequenceClassification if classifier else AutoPeftModelForCausalLM
    return auto.from_pretrained(adapter_dir, dtype="auto").merge_and_unload()


def _point_adapter_at_base(peft_model: Any, tokenizer: Any, base_dir: Path, named: Path | None = None) -> None:
    """Make the adapter's base_model_name_or_path loadable from anywhere: a local directory
    becomes absolute; a random-init base (no name) is saved to `base_dir` and named `named`
    (default `base_dir`: where it will be once its directory is renamed into place)."""
    config = peft_model.peft_config["default"]
    name = config.base_model_name_or_path
    if name is not None:
        if os.path.isdir(os.path.expanduser(name)):
            config.base_model_name_or_path = str(Path(name).expanduser().resolve())
        return
    # (base_state_dict: the base weights without the adapter layers; a module trained whole, a
    # reward model's score head, under its own name)
    base = peft_model.get_base_model()
    state = base_state_dict(peft_model)
    if is_quantized(base):
        _save_quantized_base(base, state, base_dir)
    else:
        base.save_pretrained(base_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(base_dir)
    config.base_model_name_or_path = str((named or base_dir).resolve())


def _save_quantized_base(base: Any, state: dict, base_dir: Path) -> None:
    """A quantized base as from_pretrained reads a pre-quantized bitsandbytes checkpoint: its
    config (with quantization_config) and `state` in model.safetensors. (transformers'
    save_pretrained of a quantized model writes the model's own state_dict, whatever state_dict
    it is given: here that would be peft's wrapped names.) A tied output head is left out, as
    save_pretrained leaves it: loading ties it to the input embedding again."""
    from safetensors.torch import save_file

    head = base.get_output_embeddings()
    head_name = next((n for n, m in base.named_modules() if m is head), "")
    in_head = {k for k in state if head_name and k.startswith(f"{head_name}.")}
    others = {state[k].data_ptr() for k in state if k not in in_head}
    tied = {k for k in in_head if state[k].data_ptr() in others}
    kept = {k: v.detach().contiguous() for k, v in state.items() if k not in tied}
    base_dir.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    base.config.save_pretrained(base_dir)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(base_dir)
