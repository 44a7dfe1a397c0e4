#!/usr/bin/env bash
# The memory evaluation end to end: start a δ-mem server and a --no-memory server (the
# baseline), run `deltamem eval` against both, stop them. Extra arguments go to `deltamem
# eval` (e.g. --conversations 12 --window 256 --out results/eval).
#   ADAPTER=path   serve this adapter (default: what `deltamem serve` picks, the shipped one)
#   PORT=8101      the δ-mem server's port; the baseline listens on PORT+1
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8101}
BASE_PORT=$((PORT + 1))
WORK=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# One engine at a time: start-up is CPU-bound, and a failure names its server.
start() {  # port log-name args...
    local port=$1 name=$2
    shift 2
    "$BIN/deltamem" serve --port "$port" --data-dir "$WORK/$name" --kv-cache-gib 1 "$@" \
        >"$WORK/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 600); do
        curl -fs "http://127.0.0.1:$port/health" >/dev/null && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 1
    done
    echo "the $name server on port $port did not start:" >&2
    tail -n 40 "$WORK/$name.log" >&2
    exit 1
}
start "$PORT" mem ${ADAPTER:+--adapter "$ADAPTER"}
start "$BASE_PORT" base --no-memory
grep -h "adapter" "$WORK/mem.log" | head -3 || true
"$BIN/deltamem" eval --server "http://127.0.0.1:$PORT" \
    --baseline-server "http://127.0.0.1:$BASE_PORT" "$@"
