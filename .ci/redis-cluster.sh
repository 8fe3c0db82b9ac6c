#!/usr/bin/env bash
# A local Redis Cluster for the cluster tests: three masters with one replica
# each, on free local ports, with its files in a directory of its own.
#
#   .ci/redis-cluster.sh start [DIR]   starts it; prints its URL on stdout
#                                      (redis+cluster://127.0.0.1:P1,...)
#   .ci/redis-cluster.sh stop [DIR]    stops it and removes DIR
#
# DIR defaults to ${TMPDIR:-/tmp}/idempotency-redis-cluster. A developer runs
#   export REDIS_CLUSTER_URL=$(.ci/redis-cluster.sh start)
# then the tests, then `.ci/redis-cluster.sh stop`.
set -euo pipefail

cmd=${1:-}
dir=${2:-${TMPDIR:-/tmp}/idempotency-redis-cluster}
say() { echo "redis-cluster: $*" >&2; }

stop() {
  [ -d "$dir" ] || return 0
  for pidfile in "$dir"/redis-*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    # Only a redis-server this script started (the pid file is its own).
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$dir"
}

start() {
  command -v redis-server >/dev/null || { say "redis-server is not installed"; exit 1; }
  command -v redis-cli >/dev/null || { say "redis-cli is not installed"; exit 1; }
  if [ -f "$dir/url" ]; then
    say "a cluster already runs from $dir; stop it first"
    exit 1
  fi
  mkdir -p "$dir"
  # Six ports whose cluster bus ports (port + 10000) are free too.
  read -r -a ports <<<"$(python3 - <<'PY'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
ports = []
for p in random.sample(range(20000, 30000), 10000):
    if free(p) and free(p + 10000):
        ports.append(p)
        if len(ports) == 6:
            break
print(" ".join(map(str, ports)))
PY
)"
  [ "${#ports[@]}" -eq 6 ] || { say "found no six free ports"; exit 1; }
  for p in "${ports[@]}"; do
    redis-server --port "$p" --bind 127.0.0.1 --daemonize yes \
      --cluster-enabled yes --cluster-config-file "$dir/nodes-$p.conf" \
      --cluster-node-timeout 5000 --save "" --appendonly no \
      --dir "$dir" --pidfile "$dir/redis-$p.pid" --logfile "$dir/redis-$p.log"
  done
  for p in "${ports[@]}"; do
    for _ in $(seq 100); do
      [ "$(redis-cli -p "$p" ping 2>/dev/null)" = PONG ] && break
      sleep 0.1
    done
    [ "$(redis-cli -p "$p" ping 2>/dev/null)" = PONG ] || { say "node $p does not answer (see $dir/redis-$p.log)"; stop; exit 1; }
  done
  nodes=()
  for p in "${ports[@]}"; do nodes+=("127.0.0.1:$p"); done
  if ! redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1; then
    say "redis-cli --cluster create failed:"
    cat "$dir/create.log" >&2
    stop
    exit 1
  fi
  # Every node sees every slot served, and every master has its replica.
  for _ in $(seq 300); do
    ok=1
    for p in "${ports[@]}"; do
      redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || ok=0
      [ "$(redis-cli -p "$p" cluster nodes 2>/dev/null | grep -c 'slave' || true)" = 3 ] || ok=0
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  if [ "$ok" != 1 ]; then
    say "the cluster did not reach cluster_state:ok with 3 replicas"
    stop
    exit 1
  fi
  url="redis+cluster://$(IFS=,; echo "${nodes[*]}")"
  echo "$url" >"$dir/url"
  say "up: $url (files in $dir)"
  echo "$url"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [DIR]" >&2; exit 2 ;;
esac
