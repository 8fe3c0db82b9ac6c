#!/usr/bin/env bash
# End to end: the example server under wrk, with and without the middleware.
# Usage: benches/e2e/run.sh [axum|actix] [STORE_URL]   (loopback only, 10 s a run)
set -euo pipefail
cd "$(dirname "$0")/../.."
fw=${1:-axum}
store=${2:-memory}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p examples --bin "payments-$fw"
exe="$target/release/payments-$fw"
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)"; exit 1; }
run() {
  local label=$1 script=$2; shift 2
  local port
  port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  "$exe" --listen "127.0.0.1:$port" "$@" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
  local rps
  rps=$(wrk -t1 -c16 -d10s -s "benches/e2e/$script" "http://127.0.0.1:$port/payments" | awk '/Requests\/sec/ {print $2}')
  kill "$pid"; wait "$pid" 2>/dev/null || true
  printf '%-34s %10s req/s\n' "$fw $label" "$rps"
}
run "without the middleware, fresh" fresh.lua --no-idempotency
run "with ($store), fresh keys" fresh.lua --store "$store"
run "with ($store), replays" replay.lua --store "$store"
