#!/usr/bin/env bash
# Runs the whole test suite: unit tests, in-process server tests over real mutual TLS, and end-to-end
# tests that start the real `directory`, `exchange-node` and `exchangectl` binaries (and check them with
# stock Python gRPC tooling). Needs a Rust toolchain and python3; protoc is vendored, grpcio is installed
# into ./.venv from PyPI on first run. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import grpc, grpc_health.v1, grpc_reflection.v1alpha, grpc_tools.protoc' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi
export GX_PYTHON="$PWD/.venv/bin/python"

# The end-to-end tests start the binaries from target/debug: build them first, in the same profile.
cargo build --workspace --bins --examples --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?

# One closing line over every test binary (cargo prints one per binary, the last often a 0-test doc run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "\n%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
