"""Where a model's files come from, and what stops them loading, found without loading weights.

A local directory is checked before anything else (transformers' own errors for a missing
config.json or tokenizer blame something else); a hub id is looked up in the local cache
before the network, so that a model that is neither local nor reachable fails in seconds with
a message saying how to point at a local copy. `model_config` and `reference_config` read a
model's transformers config the way loading will, without its weights.

transformers and huggingface_hub are imported inside the functions that use them: each takes
a second or more to import, and the CLI validates a config without them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dpo_cli.errors import ModelLoadError
from dpo_cli.hub import fetch_command, hub_reachable, looks_like_path, offline_setting
from dpo_cli.modeling.options import ModelConfig

TOKENIZER_PROBE = "tokenizer_config.json"  # the file whose presence in the hub cache means a cached tokenizer
# Files any one of which AutoTokenizer can start from (fast, SentencePiece, BPE and WordPiece vocabularies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what from_pretrained reads weights from (GGUF aside)


def _fetch_hint(name: str) -> str:
    fetch = fetch_command(name)
    return f"; run `{fetch}` to create it" if fetch else ""


def local_dir_problem(name: str, key: str, needs: str = "config.json") -> str | None:
    """What stops local directory `name` (the value of config key `key`) from loading, or None.

    `needs` is what must be there: config.json for a model, its .gguf file, or TOKENIZER_PROBE
    for a tokenizer (any tokenizer file). Checked up front because transformers' own errors for
    these cases blame something else (no tokenizer files: "install sentencepiece or tiktoken";
    no config.json: a JSON decoding error).
    """
    path = Path(name).expanduser()
    where = f"{key}={name!r}"
    if not path.exists():
        fix = _fetch_hint(name) or f"; point {key} at a local model directory or a hub id (org/name)"
        relative = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
        return f"{where}: no such directory{relative}{fix}"
    if not path.is_dir():
        gguf = f" and set {key.rsplit('.', 1)[0]}.gguf_file={path.name}" if path.suffix == ".gguf" else ""
        return f"{where} is a file, not a directory; point {key} at the directory holding it{gguf}"
    listing = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not listing:
        return f"{where}: directory {path} is empty{_fetch_hint(name)}; point {key} at a model directory"
    shown = ", ".join(listing[:12]) + (f", ... ({len(listing)} entries)" if len(listing) > 12 else "")
    if needs == TOKENIZER_PROBE:
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            return (
                f"{where}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...; it holds: {shown}); "
                "copy the tokenizer's files in, or set model.tokenizer to a directory or hub id that has them"
            )
        return None
    if not (path / needs).is_file():
        return f"{where}: {path} has no {needs} (it holds: {shown}); point {key} at the directory that has {needs}"
    if needs == "config.json":
        try:
            json.loads((path / needs).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{where}: {path / needs} is not valid JSON ({e}); restore it from the model's source"
    return None


def weights_problem(name: str, key: str) -> str | None:
    """What stops local model directory `name` from giving weights (its config aside), or None."""
    path = Path(name).expanduser()
    if any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        return None
    return (
        f"{key}={name!r}: {path} has config.json but no weights (*.safetensors or *.bin){_fetch_hint(name)}; "
        "copy the weight files in, or set model.gguf_file to a .gguf file in it"
    )


def source_problems(model: ModelConfig) -> list[str]:
    """Problems with the local directories the model section names (model.name_or_path, and
    model.tokenizer or else name_or_path's tokenizer files), found without loading anything.
    Hub ids are checked when loading."""
    problems = []
    name, tokenizer = model.name_or_path, model.tokenizer
    if name is not None and looks_like_path(name):
        problems.append(local_dir_problem(name, "model.name_or_path", model.gguf_file or "config.json"))
        if tokenizer is None and model.gguf_file is None and not problems[-1]:
            problems.append(local_dir_problem(name, "model.name_or_path", TOKENIZER_PROBE))
    if tokenizer is not None and looks_like_path(tokenizer):
        problems.append(local_dir_problem(tokenizer, "model.tokenizer", TOKENIZER_PROBE))
    return [p for p in problems if p]


def source_kwargs(name: str, revision: str | None, filename: str, what: str) -> dict[str, Any]:
    """Extra from_pretrained kwargs for `name`, or a ModelLoadError when it cannot be had.
    `filename` is what must be there: config.json, a .gguf file, or TOKENIZER_PROBE."""
    if looks_like_path(name):
        problem = local_dir_problem(name, what, filename)
        if problem:
            raise ModelLoadError(problem)
        return {}
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, filename, revision=revision), str)
    if hub_reachable():
        return {}
    if cached:
        return {"local_files_only": True}
    # `org/name` may have been meant as a local path: say both readings.
    offline = offline_setting()
    unreachable = f"{offline} is set, so the Hub is not asked" if offline else "the Hub cannot be reached (offline?)"
    raise ModelLoadError(
        f"{what}={name!r}: there is no local directory {name!r} (relative to {os.getcwd()}), and hub id "
        f"{name!r} is not in the local Hugging Face cache and {unreachable}{_fetch_hint(name)}. "
        f"Download it where there is network (`hf download {name} --local-dir DIR`) and run with {what}=DIR"
    )


def pretrained_kwargs(model: ModelConfig) -> dict[str, Any]:
    """from_pretrained kwargs shared by a pretrained model's config and weights (the config
    section `model`), after checking where they can come from (`source_kwargs`)."""
    source = source_kwargs(model.name_or_path, model.revision, model.gguf_file or "config.json", "model.name_or_path")
    return dict(revision=model.revision, gguf_file=model.gguf_file, trust_remote_code=model.trust_remote_code, **source)


def random_init_config(random_init: Any, tokenizer: Any) -> Any:
    """The transformers config of model.random_init's architecture, with the vocabulary size and
    special token ids of `tokenizer`."""
    from transformers import AutoConfig

    arch = dict(random_init)
    return AutoConfig.for_model(
        arch.pop("model_type"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **arch,
    )


def model_config(model: ModelConfig, tokenizer: Any) -> Any:
    """The transformers config `modeling.load_model` builds the policy from, without weights:
    random_init's architecture with the tokenizer's vocabulary, or the pretrained config."""
    if model.random_init is not None:
        return random_init_config(model.random_init, tokenizer)
    return _load_config(model.name_or_path, "model.name_or_path", pretrained_kwargs(model))


def reference_config(reference: Any, trust_remote_code: bool) -> Any:
    """The config of a separate reference model (reference.name_or_path)."""
    r = reference
    source = source_kwargs(r.name_or_path, r.revision, r.gguf_file or "config.json", "reference.name_or_path")
    kwargs = dict(revision=r.revision, gguf_file=r.gguf_file, trust_remote_code=trust_remote_code, **source)
    return _load_config(r.name_or_path, "reference.name_or_path", kwargs)


def _load_config(name: str, key: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"{key}={name!r}: could not load its config: {e}") from None
