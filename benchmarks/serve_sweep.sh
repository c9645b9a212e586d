#!/usr/bin/env bash
# The serving sweeps behind benchmarks/results/serve/*.png: start `unmask serve`, run benchmarks/serve.py over
# concurrency, threshold and cache mode, render the plots. Results (JSON) and plots go to OUT.
#
#   benchmarks/serve_sweep.sh [OUT]          # default OUT=benchmarks/results/serve
# Environment: NUM_PROMPTS (task sweeps, default 128), RANDOM_MODEL (DxL of the cache-mode model, default 256x4).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${1:-benchmarks/results/serve}
N=${NUM_PROMPTS:-128}
RANDOM_MODEL=${RANDOM_MODEL:-256x4}
mkdir -p "$OUT"
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
SERVER=""
stop() { if [ -n "$SERVER" ]; then kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=""; fi; }
trap stop EXIT
start() {  # start MODEL_ARGS...
  python -m server.cli serve --port "$PORT" --max-num-seqs 64 --dtype float32 --log-level warning "$@" \
    > "$OUT/server.log" 2>&1 &
  SERVER=$!
}
bench() {  # bench NAME ARGS...
  local name=$1; shift
  echo "== $name: python -m benchmarks.serve $*" | sed "s#$URL#URL#"
  python -m benchmarks.serve --base-url "$URL" --no-progress --result-file "$OUT/$name.json" "$@" | tail -n +2 \
    | grep -E 'throughput|Accuracy|Median (TTFT|E2EL)|Failed'
}

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD), $(nproc) CPUs (shared), torch CPU"
start
echo "# bundled model: unmask serve --max-num-seqs 64 --dtype float32"
for c in 1 2 4 8 16 32 64; do
  bench "task_dual_c$c" --dataset-name task --num-prompts "$N" --max-concurrency "$c" --cache dual --label "dual"
  bench "task_dual_t09_c$c" --dataset-name task --num-prompts "$N" --max-concurrency "$c" --cache dual \
    --threshold 0.9 --label "dual + threshold 0.9"
done
for t in 0.3 0.5 0.7 0.8 0.9 0.95 0.99; do
  bench "task_threshold_$t" --dataset-name task --num-prompts "$N" --max-concurrency 32 --cache dual --threshold "$t"
done
stop

MODEL_DIR=$(mktemp -d)/random
python - "$MODEL_DIR" "$RANDOM_MODEL" <<'PY'
import sys
from engine.random_checkpoint import write_random_checkpoint
d, layers = (int(v) for v in sys.argv[2].split("x"))
write_random_checkpoint(sys.argv[1], "llada", hidden_size=d, num_layers=layers, num_heads=max(d // 64, 1),
                        intermediate_size=d * 8 // 3 // 64 * 64, vocab_size=32000, tokenizer=True, seed=0)
PY
start --model "$MODEL_DIR"
echo "# random LLaDA d${RANDOM_MODEL}: unmask serve --model RANDOM --max-num-seqs 64 --dtype float32"
for cache in none prefix dual; do
  bench "random_cache_$cache" --dataset-name random --num-prompts 32 --max-concurrency 16 --random-input-len 128 \
    --random-output-len 64 --random-range-ratio 0.5 --steps 64 --block-length 16 --ignore-eos --cache "$cache" \
    --label "$cache"
done
stop

python -m benchmarks.plot concurrency "$OUT"/task_dual_c*.json "$OUT"/task_dual_t09_c*.json \
  -o "$OUT/throughput_vs_concurrency.png" --title "bundled model, $N task chats: throughput vs concurrency (2 shared CPUs)"
python -m benchmarks.plot latency "$OUT"/random_cache_*.json \
  -o "$OUT/latency_percentiles.png" --title "random LLaDA d${RANDOM_MODEL}, 4 blocks of 16, 16 concurrent: latency (ms)"
python -m benchmarks.plot threshold "$OUT"/task_threshold_*.json \
  -o "$OUT/tokens_per_forward_vs_threshold.png" --title "bundled model, 32 concurrent: tokens per forward vs threshold"
python -m benchmarks.plot cache "$OUT"/random_cache_*.json \
  -o "$OUT/cache_modes.png" --title "random LLaDA d${RANDOM_MODEL}, prompt 64-192, gen 64, block 16, 16 concurrent"
