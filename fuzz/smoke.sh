#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a few seconds on a temporary copy
# of its seed corpus. Exits non-zero when a target crashes (or fails to
# build); prints a skip line and exits 0 when cargo-fuzz or a nightly
# toolchain is not installed.
#
# Usage: fuzz/smoke.sh            (from anywhere)
# Env:   FUZZ_SECONDS (default 5), CARGO_TARGET_DIR (default /var/tmp/fuzz-target)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
seconds="${FUZZ_SECONDS:-5}"
targets=(key fingerprint stored_outcome key_file sql_row redis_reply outbox_row)

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz smoke: SKIP (no nightly toolchain: rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz smoke: SKIP (cargo-fuzz not installed: cargo install cargo-fuzz)"
    exit 0
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/fuzz-target}"
cd "$root"
echo "fuzz smoke: building ${targets[*]}"
cargo +nightly fuzz build --fuzz-dir fuzz

work="$(mktemp -d "${TMPDIR:-/tmp}/fuzz-smoke.XXXXXX")"
trap 'rm -rf "$work"' EXIT

failed=()
for t in "${targets[@]}"; do
    mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
    cp "fuzz/corpus/$t/"* "$work/corpus/$t/"
    echo "fuzz smoke: $t for ${seconds}s"
    if cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$work/corpus/$t" -- \
        -max_total_time="$seconds" -artifact_prefix="$work/artifacts/$t/" \
        >"$work/$t.log" 2>&1; then
        grep -E '^Done [0-9]+ runs' "$work/$t.log" || true
    else
        echo "fuzz smoke: $t FAILED; last lines of its log:"
        tail -n 40 "$work/$t.log"
        for a in "$work/artifacts/$t/"*; do
            [ -e "$a" ] || continue
            echo "crash input ($a), hex:"
            od -An -tx1 -v "$a" | head -n 20
        done
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz smoke: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz smoke: ok (${targets[*]})"
