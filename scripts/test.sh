#!/usr/bin/env bash
# Runs the whole test suite: unit tests, in-process server tests over real mutual TLS, and end-to-end
# tests that start the real `directory`, `exchange-node` and `exchangectl` binaries.
# Needs only a Rust toolchain (protoc is vendored). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests start the binaries from target/debug: build them first, in the same profile.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
