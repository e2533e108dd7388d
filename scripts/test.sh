#!/usr/bin/env bash
# Runs the whole test suite: unit tests, in-process server tests over real mutual TLS, and end-to-end
# tests that start the real `directory`, `exchange-node` and `exchangectl` binaries (and check them with
# stock Python gRPC tooling). Needs a Rust toolchain and python3; protoc is vendored, grpcio is installed
# into ./.venv from PyPI on first run. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import grpc, grpc_health.v1, grpc_reflection.v1alpha' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi
export GX_PYTHON="$PWD/.venv/bin/python"

# The end-to-end tests start the binaries from target/debug: build them first, in the same profile.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
