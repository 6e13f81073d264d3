#!/usr/bin/env bash
# Total serving throughput of `hawker serve --data-parallel-size N` for each
# N given, on the default model, in one run: each size gets a freshly started
# server and the same standard workload (all requests at once, so the
# servers run flat out), then its routing counters are read from /metrics.
#
#   bash benchmarks/data_parallel.sh [OUT_DIR] [NUM_PROMPTS] [SIZE ...]
#   bash benchmarks/data_parallel.sh /tmp/dp-bench 32 1 2
#   SERVE_ARGS="--compile-decode-max-rows 32" bash benchmarks/data_parallel.sh /tmp/dp-bench 32 1
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out/data-parallel}
NUM_PROMPTS=${2:-32}
shift $(( $# > 2 ? 2 : $# ))
SIZES=("$@")
if [ ${#SIZES[@]} -eq 0 ]; then SIZES=(1 2); fi
PORT=${PORT:-8018}
# Extra `hawker serve` flags for every size (word-split on purpose).
read -r -a EXTRA <<<"${SERVE_ARGS:-}"
mkdir -p "$OUT"

for size in "${SIZES[@]}"; do
  .venv/bin/hawker serve --port "$PORT" --log-level warning --data-parallel-size "$size" ${EXTRA[@]+"${EXTRA[@]}"} \
    >"$OUT/server-dp$size.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 1
  done
  echo "== data-parallel-size $size"
  .venv/bin/hawker bench serve --url "http://127.0.0.1:$PORT" --num-prompts "$NUM_PROMPTS" \
    --request-rate inf --json-out "$OUT/serve-dp$size.json" | tee "$OUT/serve-dp$size.txt"
  curl -sf "http://127.0.0.1:$PORT/metrics" \
    | grep -E '^hawker:(router_requests_total|generation_tokens_total|prefix_cache_hits_total|engine_steps_total)' \
    | tee "$OUT/metrics-dp$size.txt"
  kill -TERM "$server"
  wait "$server" || true
done
