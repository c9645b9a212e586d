#!/usr/bin/env bash
# Everything a GPU lease should check, in one call, in order of importance, each step bounded well inside the call:
#   1. benchmarks/kernels/run_gpu.sh: tests/kernels compiled on CUDA, then the kernel benchmarks   (KERNELS_S, 300 s)
#   2. benchmarks/gpu_step.py: end-to-end steps of an LLaDA-8B-shaped model, Triton then torch      (STEP_S, 240 s)
# Each step is stopped with SIGINT first (Python unwinds and frees the GPU), then killed 20 s later: the one lease so
# far lost its second call to a GPU still held by a process that `timeout` had killed outright. Results go to $OUT
# when set (the device tool's output folder), else benchmarks/results/.
#
#   bash benchmarks/gpu_lease.sh            # on the lent GPU (the device tool runs it in the repo root)
#   bash benchmarks/gpu_lease.sh --smoke    # on CPU: the same steps at tiny shapes (interpreted kernels)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
DEST=${OUT:-benchmarks/results}
SMOKE=()
if [ "${1:-}" = "--smoke" ]; then
  SMOKE=(--smoke)
  DEST=${OUT:-/tmp}
fi
bounded() {  # bounded SECONDS CMD...: SIGINT at the bound, SIGKILL 20 s later
  timeout -s INT -k 20 "$@"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
"$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"

RESULT="$DEST/gpu_kernels.md" bounded "${KERNELS_S:-300}" bash benchmarks/kernels/run_gpu.sh "${SMOKE[@]}" \
  > "$DEST/run_gpu.log" 2>&1
echo "run_gpu.sh exit $?"
tail -n 3 "$DEST/run_gpu.log"

STEP_ARGS=(--out "$DEST/gpu_step.md")
if [ ${#SMOKE[@]} -gt 0 ]; then
  STEP_ARGS+=(--smoke --kernels torch --batches 1,2 --gen-len 8 --block-length 4 --repeats 1)
fi
bounded "${STEP_S:-240}" "$PY" -m benchmarks.gpu_step "${STEP_ARGS[@]}" > "$DEST/gpu_step.log" 2>&1
echo "gpu_step exit $?"
cat "$DEST/gpu_step.md" 2>/dev/null
