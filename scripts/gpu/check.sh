#!/usr/bin/env bash
# One prepared check of dpo-cli on a bare GPU machine, within 8 minutes:
#
#   bash scripts/gpu/check.sh [--out DIR] [--device cpu|cuda|auto] [--dry-run] [--stages env,bench,...]
#
# 1. Installs the wheels carried in .whl/ (scripts/gpu/wheels.sh fetches them) into /tmp/site, when
#    the machine lacks the packages; no network is used.
# 2. Runs these stages, each under its own time limit (seconds), each output kept:
#      env        15  nvidia-smi, the device, library versions, whether dpo-cli imports
#      gpu_tests 100  pytest -m gpu tests/test_gpu.py, test_optimizers.py, test_qlora.py (skipped without
#                     CUDA; all skipped counts as skipped; the CPU-offload test needs torchao, not carried)
#      head       15  scripts/bench_head.py: the LM head alone, full logits vs chunked (float32 / bf16 GEMM)
#      bench     150  scripts/bench.py --models qwen05 --steps 2,5: dpo-cli's defaults against TRL's at 1024
#                     and 2048 tokens (--device cpu --dry-run on CPU); BENCH_ARGS replaces its arguments
#      compile    60  the same at 2048 tokens, dpo-cli alone, with and without train.compile (CUDA only)
#      profile    25  scripts/profile_step.py --model qwen05 at 2048 tokens: phases and top CUDA kernels
#      resume     55  5 bf16 steps uninterrupted vs SIGKILL after the step-3 checkpoint + resume: bit-equal rows
#      fsdp       60  the same (4 steps, kill after 2) through accelerate launch --config_file scripts/accelerate/fsdp.yaml
#                     --num_processes 1; skipped on CPU (FSDP_STAGE_CONFIG=another config runs it there, for tests)
#    The limits add up to 8 minutes: a stage that reaches its limit is stopped and reported, and
#    the others still run.
# 3. Writes summary.json, summary.md, bench.json and logs.txt (every stage's output) to --out, else
#    $OUT, else a new temporary directory. Exit 0 when no stage failed (skipped is fine), 1 otherwise,
#    2 on a usage error.
#
# Environment: PYTHON (default python3), BENCH_ARGS, FSDP_STAGE_CONFIG, SITE (default /tmp/site).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
ALL_STAGES=env,gpu_tests,head,bench,compile,profile,resume,fsdp

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() {
    echo "check.sh: $*" >&2
    exit 2
}

out_dir=${OUT:-}
device=auto
dry_run=0
want=$ALL_STAGES
while (($#)); do
    case $1 in
    --out) out_dir=${2:?--out needs a directory}; shift 2 ;;
    --out=*) out_dir=${1#--out=}; shift ;;
    --device) device=${2:?--device needs cpu, cuda or auto}; shift 2 ;;
    --device=*) device=${1#--device=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    --stages) want=${2:?--stages needs a list}; shift 2 ;;
    --stages=*) want=${1#--stages=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done
case $device in cpu | cuda | auto) ;; *) die "--device $device: choose cpu, cuda or auto" ;; esac
for s in ${want//,/ }; do
    [[ ,$ALL_STAGES, == *,$s,* ]] || die "--stages: unknown stage $s (stages: $ALL_STAGES)"
done
if [[ -z $out_dir ]]; then
    out_dir=$(mktemp -d -t gpu-check.XXXXXX)
    echo "check.sh: no --out and no \$OUT: writing to $out_dir"
fi
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
rm -f "$out_dir"/{summary.json,summary.md,bench.json,logs.txt}

WORK=$(mktemp -d -t gpu-check-work.XXXXXX) # run directories and checkpoints: never brought back
trap 'rm -rf "$WORK"' EXIT
: >"$WORK/stages.tsv"
started=$SECONDS
cd "$REPO"

# --- the carried wheels: installed only where their packages are missing (a bare GPU machine)
if compgen -G "$REPO/.whl/*.whl" >/dev/null && ! "$PY" -c 'import hydra, omegaconf, datasets, trl' 2>/dev/null; then
    site=${SITE:-/tmp/site}
    echo "check.sh: installing $(find "$REPO/.whl" -type f -name '*.whl' | wc -l) carried wheels into $site"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$REPO"/.whl/*.whl
    export PYTHONPATH=$site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
# Without them every stage would fail the same way: say so once, at once.
"$PY" -c 'import hydra, omegaconf, datasets, trl' 2>/dev/null ||
    die "$PY cannot import hydra, omegaconf, datasets or trl, and no carried wheel supplies them: run \
bash scripts/gpu/wheels.sh where PyPI is reachable, then carry .whl to this machine"

# Nothing reaches the network, nothing lands in ~/.cache.
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export DPO_CLI_CACHE_DIR=$WORK/cache DPO_CLI_REFERENCE_CACHE_DIR=$WORK/refcache

cuda=$(timeout 60 "$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [[ $device == auto ]]; then
    device=$([[ $cuda == 1 ]] && echo cuda || echo cpu)
elif [[ $device == cuda && $cuda != 1 ]]; then
    die "--device cuda, but torch ($PY) sees no CUDA device"
fi
[[ $device == cpu ]] && export CUDA_VISIBLE_DEVICES="" # a CPU check on a GPU machine stays on the CPU
echo "check.sh: device $device$([[ $dry_run == 1 ]] && echo ', dry run'), stages $want, python $PY, output $out_dir"

# record NAME CODE SECONDS TIMEOUT DETAIL: one line of stages.tsv (summary.py reads it)
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(printf %s "$5" | tr '\t\n' '  ')" >>"$WORK/stages.tsv"; }

# stage NAME TIMEOUT CMD...: run CMD under its limit, output to WORK/NAME.log; never stops the script
stage() {
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    [[ ,$want, == *,$name,* ]] || return 0
    echo "check.sh: stage $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1 </dev/null || rc=$?
    record "$name" "$rc" "$((SECONDS - t0))" "$limit" "$*"
    echo "check.sh: stage $name exited $rc after $((SECONDS - t0)) s"
}

skip() { [[ ,$want, == *,$1,* ]] && record "$1" skipped 0 0 "$2" || true; }

# The run every training stage starts from: the quick debug run, plain DPO, no extras.
RUN=(debug=default loss=dpo logger.wandb.mode=disabled logger.progress=false logger.report=false judge=none model=tiny)
if [[ $device == cuda ]]; then # wide enough that bf16 runs through real GEMM kernels, still seconds a run
    RUN+=(model.random_init.hidden_size=512 model.random_init.intermediate_size=1536 model.random_init.num_hidden_layers=4
        model.random_init.num_attention_heads=8 model.random_init.num_key_value_heads=8)
fi

# 1. env
wheels=()
[[ -d $REPO/.whl ]] && wheels=(--wheels "$REPO/.whl")
stage env 15 bash -c 'command -v nvidia-smi >/dev/null && nvidia-smi; "$@"' _ \
    "$PY" scripts/gpu/env_probe.py --json "$WORK/env.json" "${wheels[@]}"

# 2. gpu tests (the gpu mark replaces pyproject's -m "not slow")
stage gpu_tests 100 "$PY" -m pytest -m gpu tests/test_gpu.py tests/test_optimizers.py tests/test_qlora.py -v -p no:cacheprovider  # -v: each result as it comes

# 3. the LM head alone (Qwen2.5's 151936 x 896 head, 16384 positions on a GPU; small on a CPU)
head_args=(--json "$WORK/head.json")
[[ $device == cpu ]] && head_args+=(--device cpu --positions 512 --vocab 8192 --hidden 256 --repeat 2)
stage head 15 "$PY" scripts/bench_head.py "${head_args[@]}"

# 3. bench
if [[ -n ${BENCH_ARGS:-} ]]; then
    read -r -a bench_args <<<"$BENCH_ARGS"
elif [[ $device == cuda && $dry_run == 0 ]]; then
    bench_args=(--models qwen05 --device cuda --dtype bf16 --seq 2048,1024 --steps 2,5 --json "$out_dir/bench.json")
else
    bench_args=(--models qwen05 --device "$device" --dry-run --json "$out_dir/bench.json")
fi
stage bench 150 "$PY" scripts/bench.py "${bench_args[@]}"

# 5. train.compile: dpo-cli's defaults with and without it, at 2048 tokens (a stage of its own, so
#    that a slow compile cannot cost the benchmark above its figures)
if [[ $device == cuda && $dry_run == 0 ]]; then
    stage compile 60 "$PY" scripts/bench.py --models qwen05 --device cuda --dtype bf16 --steps 2,5 --seq 2048 --no-trl \
        --variant default: --variant compile:train.compile=true --json "$WORK/compile.json"
else
    skip compile "measured on CUDA only (the gain that decides train.compile's default); tests/test_compile.py checks what compiled blocks compute on a CPU"
fi

# 6. where one step's time goes: dpo-cli's defaults on qwen05 at 2048 tokens (shrunk on a CPU)
if [[ $device == cuda && $dry_run == 0 ]]; then
    profile_args=(--model qwen05 --device cuda --lengths fixed --seq 2048 --batch 8 --top 12)
else
    profile_args=(--model qwen05 --small --device cpu --lengths fixed --seq 64 --batch 2 --top 5)
fi
stage profile 25 "$PY" scripts/profile_step.py "${profile_args[@]}" --json "$WORK/profile.json"

# 4. resume: 5 bf16 steps; the killed run stops after its step-3 checkpoint
stage resume 55 "$PY" scripts/gpu/resume_check.py --json "$WORK/resume.json" --work "$WORK/resume" \
    --kill-after 3 --timeout 50 -- "${RUN[@]}" train.mixed_precision=bf16 train.max_steps=5 train.save_every=1 \
    train.keep_checkpoints=null

# 5. fsdp: 4 steps through the FSDP2 config on one process, killed after step 2, resumed
if [[ $device == cpu && -z ${FSDP_STAGE_CONFIG:-} ]]; then
    skip fsdp "accelerate runs FSDP only on a GPU"
else
    stage fsdp 60 "$PY" scripts/gpu/resume_check.py --json "$WORK/fsdp.json" --work "$WORK/fsdp" --kill-after 2 \
        --timeout 55 --launch "${FSDP_STAGE_CONFIG:-scripts/accelerate/fsdp.yaml}" -- "${RUN[@]}" train.max_steps=4 \
        train.save_every=2 train.keep_checkpoints=null
fi

# Every stage's output in one file (the device tool brings back at most 8 files from $OUT).
for f in "$WORK"/stages.tsv "$WORK"/*.log "$WORK"/*/runs.log; do
    if [[ -f $f ]]; then
        printf '\n===== %s =====\n' "${f#"$WORK"/}"
        cat "$f"
    fi
done >"$out_dir/logs.txt"

verdict=0
summary_args=(--work "$WORK" --out "$out_dir" --device "$device" --seconds "$((SECONDS - started))")
[[ $dry_run == 1 ]] && summary_args+=(--dry-run)
"$PY" scripts/gpu/summary.py "${summary_args[@]}" || verdict=$?
exit "$verdict"
