#!/usr/bin/env bash
# The whole GPU check of the Triton kernels, in one go (device time is scarce):
#   1. tests/kernels on CUDA (compiled kernels, CUDA-graph capture tests included);
#   2. the attention / MoE / vocabulary benchmarks against their torch paths;
# writing one markdown file with the command, the device, versions, the test summary and the tables.
#
#   benchmarks/kernels/run_gpu.sh            # on a CUDA machine -> benchmarks/results/gpu_kernels.md
#   benchmarks/kernels/run_gpu.sh --smoke    # on CPU under TRITON_INTERPRET=1, tiny shapes -> /tmp/...
# When $OUT is set (the device tool's output folder) the markdown and the test log are copied there.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
# the device image has python3 and no python
PY=${PYTHON:-$(command -v python3 || command -v python)}
SMOKE=""
if [ "${1:-}" = "--smoke" ]; then
  SMOKE="--smoke"
  export TRITON_INTERPRET=1
  RESULT=${RESULT:-/tmp/gpu_kernels_smoke.md}
  TESTS=(tests/kernels -q -x -m "not slow" -p no:cacheprovider)
else
  unset TRITON_INTERPRET
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh: no CUDA device (use --smoke on CPU)')" || exit 2
  RESULT=${RESULT:-benchmarks/results/gpu_kernels.md}
  TESTS=(tests/kernels -q -p no:cacheprovider)
  # compiling the kernels dominates a first run: spread the tests over processes where pytest-xdist is installed,
  # and bound each test where pytest-timeout is (a hung launch must not eat the device lease)
  "$PY" -c "import xdist" 2>/dev/null && TESTS+=(-n "${TEST_WORKERS:-8}")
  "$PY" -c "import pytest_timeout" 2>/dev/null && TESTS+=(--timeout 300)
fi
LOG=${RESULT%.md}.tests.log

{
  echo "# Triton kernels: tests on the device and benchmarks"
  echo
  echo "- command: \`benchmarks/kernels/run_gpu.sh ${SMOKE}\`"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- device: $("$PY" -c 'from benchmarks.kernels.common import device, device_name; print(device_name(device()))')"
  echo "- versions: $("$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")')"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
} > "$RESULT"

"$PY" -m pytest "${TESTS[@]}" > "$LOG" 2>&1
TEST_RC=$?
{
  echo "## tests/kernels (exit code $TEST_RC)"
  echo
  echo '```'
  tail -n 15 "$LOG"
  echo '```'
  echo
  echo "## Benchmarks (median ms; speedup = torch / triton; peaks measured on this device)"
  echo
} >> "$RESULT"

BENCH_RC=0
for bench in attention moe vocab; do
  "$PY" -m "benchmarks.kernels.bench_${bench}" ${SMOKE} --out "$RESULT" || { BENCH_RC=1; echo "bench_${bench} failed" >> "$RESULT"; }
done

if [ -n "${OUT:-}" ] && [ -d "${OUT}" ] && [ "$(dirname "$(realpath "$RESULT")")" != "$(realpath "$OUT")" ]; then
  cp "$RESULT" "$LOG" "$OUT"/
fi
echo "wrote $RESULT (tests exit $TEST_RC, benchmarks exit $BENCH_RC)"
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
