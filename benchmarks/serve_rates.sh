#!/usr/bin/env bash
# `hawker bench serve` against `hawker serve` on the default model at several
# request rates. Each rate gets a freshly started server: the workload is the
# same at every rate, so a warm server would serve the later rates' prompts
# from its prefix cache and report prefill-free TTFTs.
#
#   bash benchmarks/serve_rates.sh [OUT_DIR] [NUM_PROMPTS] [RATE ...]
#   bash benchmarks/serve_rates.sh /tmp/serve-bench 64 0.25 0.5 1
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out}
NUM_PROMPTS=${2:-64}
shift $(( $# > 2 ? 2 : $# ))
RATES=("$@")
if [ ${#RATES[@]} -eq 0 ]; then RATES=(0.25 0.5 1); fi
PORT=${PORT:-8017}
mkdir -p "$OUT"

for rate in "${RATES[@]}"; do
  .venv/bin/hawker serve --port "$PORT" --log-level warning >"$OUT/server-$rate.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 1
  done
  .venv/bin/hawker bench serve --url "http://127.0.0.1:$PORT" --num-prompts "$NUM_PROMPTS" \
    --request-rate "$rate" --json-out "$OUT/serve-$rate.json" | tee "$OUT/serve-$rate.txt"
  kill -TERM "$server"
  wait "$server" || true
done
