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

# The console test drives headless Chromium through chromedriver (Debian's packages).
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "chromium: $(/usr/bin/chromium --version 2>/dev/null | head -n 1)"
elif [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
  echo "chromium: installing chromium and chromium-driver for the console test"
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd=sudo
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
else
  echo "chromium: missing and no root or sudo to install it; the console test skips unless GX_REQUIRE_CHROMIUM is set"
fi

# The PostgreSQL store tests need a real server: one for the whole run (scripts/postgres.sh), as an
# unprivileged user in a temporary folder on a free port, stopped and removed on exit. Without one the
# tests would start their own; they never skip.
source scripts/postgres.sh
gx_pg_install
log=""
trap 'gx_pg_stop; [ -z "$log" ] || rm -f "$log"' EXIT
# Durability is the backend's business, not the tests': a throw-away server need not fsync.
gx_pg_start fsync=off full_page_writes=off

# The end-to-end tests start the binaries from target/debug: build them first, in the same profile.
cargo build --workspace --bins --examples --locked
log=$(mktemp)
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?

# One closing line over every test binary (cargo prints one per binary, the last often a 0-test doc run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "\n%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
