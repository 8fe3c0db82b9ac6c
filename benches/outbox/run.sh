#!/usr/bin/env bash
# Runs the outbox benches (release build) against the local services and
# keeps the output: benches/outbox/run.sh [label]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/idempotency-target}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
out=/var/tmp/outbox-bench-${1:-run}.log
cargo bench -p benches --bench outbox 2>&1 | tee "$out"
