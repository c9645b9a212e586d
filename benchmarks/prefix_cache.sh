#!/usr/bin/env bash
# Prompt-prefix reuse, measured: a tiny random LLaDA2 checkpoint (block-causal) served on the CPU twice, with prefix
# caching (default) and with --no-prefix-caching, under the shared-prefix workload of benchmarks/serve.py (every
# prompt = one 512-token system prompt + its own 16 tokens). Results: benchmarks/results/prefix_cache/{on,off}.json
# and ttft.png (TTFT / TPOT / ITL / E2EL); the table is in benchmarks/results/prefix_cache.md.
set -euo pipefail
OUT=${OUT:-benchmarks/results/prefix_cache}
CKPT=${CKPT:-$(mktemp -d)/llada2-tiny}
PORT=${PORT:-8011}
N=${N:-32}
mkdir -p "$OUT"
python -c "from engine.random_checkpoint import write_random_checkpoint as w; \
w('$CKPT', 'llada2_moe', hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, \
  n_group=4, topk_group=2, moe_intermediate_size=128, vocab_size=512, seed=1)"
for mode in off on; do
  flag=""
  if [ "$mode" = off ]; then flag=--no-prefix-caching; fi
  unmask serve --model "$CKPT" --port "$PORT" --log-level warning $flag &
  pid=$!
  python -m benchmarks.serve --base-url "http://127.0.0.1:$PORT" --dataset-name shared-prefix --shared-prefix-len 512 \
    --random-input-len 16 --random-output-len 16 --random-token-range 10 400 --block-length 16 --steps 4 \
    --num-prompts "$N" --max-concurrency 4 --ignore-eos --no-progress --label "prefix caching $mode" \
    --result-file "$OUT/$mode.json" || { kill "$pid"; exit 1; }
  kill "$pid"
  wait "$pid" || true
done
python -m benchmarks.plot latency "$OUT/off.json" "$OUT/on.json" -o "$OUT/ttft.png"
