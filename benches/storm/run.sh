#!/usr/bin/env bash
# Duplicate storm: KEYS keys x DUPS concurrent identical POST /payments, over
# two instances of payments-axum sharing one store; checks that the handler ran
# exactly once per key and that every duplicate got the same payment.
#
# Usage: benches/storm/run.sh [STORE_URL...]
#   default stores: $REDIS_URL, $DATABASE_URL, sqlite (a temporary file)
#   redis://HOST:PORT       -> a free database N in 1..15 (FLUSHDB after)
#   postgres://.../DB       -> a fresh database storm_<id>, --transactional (dropped after)
#   sqlite                  -> sqlite://<tmpfile>, --transactional, two processes on one file
#   memory                  -> one instance only (not shared across processes)
# Environment: KEYS (10000), DUPS (10), CONNECTIONS (128), TIME_LIMIT (120 s:
#   no new key after it), GRACE (60 s), STORM_OUT (append a markdown row there).
# Loopback only; exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-/var/tmp/idempotency-target}
CARGO_TARGET_DIR=$target cargo build --release -q -p examples --bin payments-axum
exe="$target/release/payments-axum"
KEYS=${KEYS:-10000} DUPS=${DUPS:-10} CONNECTIONS=${CONNECTIONS:-128}
TIME_LIMIT=${TIME_LIMIT:-120} GRACE=${GRACE:-60}
if [ $# -eq 0 ]; then
  set -- "${REDIS_URL:-redis://127.0.0.1:6379}" \
    "${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}" sqlite
fi
work=$(mktemp -d /tmp/storm.XXXXXX)
pids=()
cleanup_cmds=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
  for c in "${cleanup_cmds[@]}"; do eval "$c" || true; done
  cleanup_cmds=()
}
trap 'stop; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
start() { # start LOGNAME ARGS... -> sets $addr (host:port)
  local log=$1; shift
  local port; port=$(free_port)
  "$exe" --listen "127.0.0.1:$port" --ttl 10m "$@" >"$work/$log.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && { addr="127.0.0.1:$port"; return; }
    sleep 0.1
  done
  echo "instance $log did not start:" >&2; cat "$work/$log.log" >&2; return 1
}
status=0
for url in "$@"; do
  rid=$(printf '%08x' $((RANDOM * 32768 + RANDOM)))
  flags=() instances=2 count=ledger label=$url
  case $url in
    redis://*|rediss://*)
      base=${url%/}
      [[ $base =~ ^(.*//[^/]*)/[0-9]+$ ]] && base=${BASH_REMATCH[1]}
      n=
      for i in $(shuf -i 1-15); do
        if [ "$(redis-cli -u "$base/$i" DBSIZE)" = 0 ]; then n=$i; break; fi
      done
      [ -n "$n" ] || { echo "no empty redis database in 1..15" >&2; status=1; continue; }
      store="$base/$n"; label="redis (db $n)"
      cleanup_cmds+=("redis-cli -u '$store' FLUSHDB >/dev/null")
      ;;
    postgres://*|postgresql://*)
      db="storm_$rid"
      psql -q "$url" -c "CREATE DATABASE $db" >/dev/null
      store="${url%/*}/$db"; label="postgres (fresh db, --transactional)"
      flags=(--transactional) count=table
      cleanup_cmds+=("psql -q '$url' -c 'DROP DATABASE IF EXISTS $db WITH (FORCE)' >/dev/null")
      ;;
    sqlite|sqlite://*)
      if [ "$url" = sqlite ]; then store="sqlite://$work/storm-$rid.db"; else store=$url; fi
      label="sqlite (one file, --transactional)"
      flags=(--transactional) count=table
      ;;
    memory)
      store=memory instances=1 label="memory (one instance)"
      ;;
    *) echo "unknown store $url" >&2; status=1; continue ;;
  esac
  targets=()
  for i in $(seq "$instances"); do
    # The first instance creates the schema before the second starts.
    start "$rid-$i" --store "$store" "${flags[@]}" || { stop; status=1; continue 2; }
    targets+=(--target "$addr")
  done
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  echo "== $label: $KEYS keys x $DUPS, ${instances} instance(s), load average before: $load" >&2
  rc=0
  out=$(python3 benches/storm/storm.py "${targets[@]}" --keys "$KEYS" --dups "$DUPS" \
    --connections "$CONNECTIONS" --time-limit "$TIME_LIMIT" --grace "$GRACE" \
    --count "$count" --run-id "$rid") || rc=$?
  load_after=$(cut -d' ' -f1-3 /proc/loadavg)
  echo "$out"
  stop
  if [ -n "${STORM_OUT:-}" ] && [ -n "$out" ]; then
    LABEL=$label LOAD="$load / $load_after" python3 - "$out" >>"$STORM_OUT" <<'EOF'
import json, os, sys
s = json.loads(sys.argv[1])
other = sum(s["other_status_retried"].values())
print(f"| {os.environ['LABEL']} | {s['requests']} ({s['keys_started']} keys x {s['dups']}) "
      f"| {s['elapsed_s']} | {s['rps']} | {s['p50_ms']} | {s['p99_ms']} "
      f"| {s['conflicts_409_retried']} | {other} {s['other_status_retried'] or ''} "
      f"| {s['connection_errors_retried']} | {s['handler_executions']} "
      f"| {'yes' if s['executions_equal_keys'] else 'NO'} | {'yes' if s['ok'] else 'NO'} "
      f"| {os.environ['LOAD']} |")
EOF
  fi
  [ "$rc" = 0 ] || status=$rc
done
exit "$status"
