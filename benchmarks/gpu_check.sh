#!/usr/bin/env bash
# One invocation on a GPU machine: build the fused WKV extensions, run the GPU kernel tests
# against the float64 reference, then the GPU benchmark against flash-linear-attention.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; OUT=folder for logs
#
# Needs only torch (+ pytest for the tests, ninja and nvcc for the build). fla-core is
# installed offline from .whl/ when that folder holds its wheel (`pip download --no-deps
# fla-core -d .whl` on a machine with internet). Every step is guarded and time-limited, so
# one failure does not stop the rest; everything goes to stdout and to $OUT.
# BASELINE=folder of other CUDA sources (e.g. a copy of the previous commit's cuda/) also
# times those kernels, built in the background while the tests run.
# Worst case about 9.5 minutes (the time limits); expected 5 to 8, most of it fla's autotuning.
# It then runs benchmarks/gpu_train_check.sh (the trainer itself on the GPU) when less than
# TRAIN_CHECK_BEFORE_S (240) seconds have gone, so a fast run does everything in one call.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/rwkv_torch_extensions}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

step() {  # step NAME TIMEOUT_S CMD...: run, tee to $OUT/NAME.log, record status and time
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$SUMMARY"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c 'import torch, sys; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
    which nvcc ninja
    nvcc --version | tail -2
} 2>&1 | tee "$OUT/env.log"

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

BENCH_ARGS=()
if [ -n "${BASELINE:-}" ] && [ -d "$BASELINE" ]; then
    BENCH_ARGS=(--baseline "$BASELINE")
    (timeout 300 $PY -c 'import sys; from pathlib import Path; sys.path.insert(0, "benchmarks")
from bench_wkv_gpu import load_baseline; load_baseline(Path(sys.argv[1])); print("baseline built")' \
        "$BASELINE" >"$OUT/baseline_build.log" 2>&1 &)
fi

# 1. Build both extensions, timed (the CUDA one for this GPU's compute capability only).
step build 180 $PY -m rwkv_train.ops.build --target all
$PY -c 'import rwkv_train.ops as o; print("import rwkv_train.ops: ok", o.__all__)' 2>&1 | tee -a "$SUMMARY"

# 2. Correctness: CUDA vs float64 reference (and the model, where it imports here).
#    --noconftest: the suite's conftest may need packages this machine lacks.
step test_cuda 150 $PY -m pytest tests/test_ops_cuda.py -q -rA --noconftest -p no:cacheprovider \
    --durations=10

# 3. Speed and accuracy against fla.
step bench 330 $PY benchmarks/bench_wkv_gpu.py --out "$OUT" "${BENCH_ARGS[@]}"

# 4. The trainer itself on the GPU (benchmarks/gpu_train_check.sh, about 5 minutes), when this
#    invocation has that long left before the lease's 10-minute limit per command.
if [ "$SECONDS" -lt "${TRAIN_CHECK_BEFORE_S:-240}" ]; then
    OUT="$OUT" bash benchmarks/gpu_train_check.sh
else
    echo "gpu_train_check: skipped, $SECONDS s used (run it on its own)" | tee -a "$SUMMARY"
fi

echo "=== summary"
cat "$SUMMARY"
grep -E "passed|failed|error" "$OUT/test_cuda.log" | tail -3
[ -f "$OUT/bench_wkv_gpu.md" ] && cat "$OUT/bench_wkv_gpu.md"
exit 0
