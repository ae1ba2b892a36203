#!/usr/bin/env bash
# The wheels that scripts/gpu/check.sh installs on the GPU machine, fetched here into .whl/
# (git-ignored; the device tool carries it: `carry: [".whl"]`).
#
#   bash scripts/gpu/wheels.sh          # download into .whl/ (replacing what is there), print sizes
#   bash scripts/gpu/wheels.sh --list   # the pinned NAME==VERSION list, one a line; no network
#
# The machine (Python 3.12, manylinux x86-64; .library/device/KINDS.md lists its packages) has
# torch, transformers, accelerate, peft, pyarrow, pandas, xxhash, fsspec, huggingface-hub, pytest
# ... but not these. Versions: what the project's development environment runs (pip list there).
#   hydra-core, omegaconf, antlr4-python3-runtime 4.9.3 (omegaconf pins 4.9.*): the config
#   datasets, and its needs missing there: dill, multiprocess (py312 wheel)
#   trl: scripts/bench.py's baseline and the TRL parity tests (its needs are all there, datasets aside)
#   bitsandbytes: QLoRA and the 8-bit/paged optimizers on CUDA (the gpu tests of test_qlora.py and
#   test_optimizers.py); 43 MB. torchao is not carried: its release must match the machine's torch.
# Not carried: wandb (dpo_cli imports it only when logger.wandb.mode is not disabled, TRL only if
# installed), hydra-submitit-launcher (SLURM sweeps only). About 45 MB in all (limit: 64 MiB a call).
# antlr4-python3-runtime 4.9.3 exists only as a source archive: it is built here into a pure-Python
# (py3-none-any) wheel.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
DEST=$REPO/.whl
WHEELS=(
    hydra-core==1.3.8
    omegaconf==2.3.1
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    trl==1.16.0
    bitsandbytes==0.50.2
)
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3)

if [[ ${1:-} == --list ]]; then
    printf '%s\n' "${WHEELS[@]}" "${SOURCE_ONLY[@]}"
    exit 0
fi
[[ $# -eq 0 ]] || {
    echo "usage: bash scripts/gpu/wheels.sh [--list]" >&2
    exit 2
}

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"
# A pure-Python source archive builds the same wheel on any Python: build it here.
"$PY" -m pip wheel -q --no-deps --no-binary "${SOURCE_ONLY[@]%%==*}" -w "$DEST" "${SOURCE_ONLY[@]}"

n=$(find "$DEST" -type f -name '*.whl' | wc -l)
expected=$((${#WHEELS[@]} + ${#SOURCE_ONLY[@]}))
ls -l "$DEST"
echo "$n wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
if ((n != expected)); then
    echo "wheels.sh: expected $expected wheels, found $n (two versions of one stop the install there)" >&2
    exit 1
fi
