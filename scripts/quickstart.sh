#!/usr/bin/env bash
# Starts a local gov-exchange: a directory and three department nodes (tax, commerce, quality) on embedded
# sled stores, with a freshly generated PKI; publishes the sample catalogs in deploy/local/catalog/, shows a
# few searches, and keeps running until Ctrl-C.
#
# State (PKI, configs, stores, logs) goes to $GX_HOME (default ./.quickstart), wiped at each start.
# Ports: directory $GX_DIRECTORY_PORT (7400), nodes 7401-7403 (override with GX_BASE_PORT).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
GX_HOME=${GX_HOME:-$ROOT/.quickstart}
DIR_PORT=${GX_DIRECTORY_PORT:-7400}
BASE_PORT=${GX_BASE_PORT:-7401}
DEPTS=(tax commerce quality)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Building (debug profile, shared with the tests)"
cargo build --workspace --bins --quiet
BIN=$ROOT/target/debug
CTL=$BIN/exchangectl

for port in "$DIR_PORT" $(seq "$BASE_PORT" $((BASE_PORT + ${#DEPTS[@]} - 1))); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use (another quickstart running?). Set GX_DIRECTORY_PORT / GX_BASE_PORT." >&2
    exit 1
  fi
done

rm -rf "$GX_HOME"
mkdir -p "$GX_HOME"/{pki,config,data,logs}
PKI=$GX_HOME/pki

say "Generating a CA and certificates in $PKI"
"$CTL" pki init --dir "$PKI" >/dev/null
"$CTL" pki issue --dir "$PKI" --dept central --role directory --name directory >/dev/null
"$CTL" pki issue --dir "$PKI" --dept central --role operator --name central-operator >/dev/null
for d in "${DEPTS[@]}"; do
  "$CTL" pki issue --dir "$PKI" --dept "$d" --role node --name "$d-node" >/dev/null
  "$CTL" pki issue --dir "$PKI" --dept "$d" --role operator --name "$d-operator" >/dev/null
  "$CTL" pki issue --dir "$PKI" --dept "$d" --role app --name "$d-app" >/dev/null
done
ls "$PKI"

cat > "$GX_HOME/config/directory.toml" <<TOML
listen = "127.0.0.1:$DIR_PORT"
data_dir = "$GX_HOME/data/directory"
lease_ttl_seconds = 15

[tls]
ca = "$PKI/ca.crt"
cert = "$PKI/directory.crt"
key = "$PKI/directory.key"
TOML

PIDS=()
cleanup() {
  trap - INT TERM EXIT
  echo
  say "Stopping"
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "State kept in $GX_HOME (wiped at the next start)."
}
trap cleanup INT TERM EXIT

say "Starting the directory on 127.0.0.1:$DIR_PORT"
"$BIN/directory" --config "$GX_HOME/config/directory.toml" >"$GX_HOME/logs/directory.log" 2>&1 &
PIDS+=($!)

export EXCHANGE_CA=$PKI/ca.crt EXCHANGE_CERT=$PKI/central-operator.crt EXCHANGE_KEY=$PKI/central-operator.key
export EXCHANGE_DIRECTORY=127.0.0.1:$DIR_PORT
for _ in $(seq 100); do "$CTL" whoami >/dev/null 2>&1 && break; sleep 0.1; done

port=$BASE_PORT
for d in "${DEPTS[@]}"; do
  cat > "$GX_HOME/config/$d-node.toml" <<TOML
listen = "127.0.0.1:$port"
advertise_address = "127.0.0.1:$port"
directory_address = "127.0.0.1:$DIR_PORT"
data_dir = "$GX_HOME/data/$d-node"
catalog_file = "$ROOT/deploy/local/catalog/$d.toml"

[tls]
ca = "$PKI/ca.crt"
cert = "$PKI/$d-node.crt"
key = "$PKI/$d-node.key"
TOML
  say "Starting the $d node on 127.0.0.1:$port"
  "$BIN/exchange-node" --config "$GX_HOME/config/$d-node.toml" >"$GX_HOME/logs/$d-node.log" 2>&1 &
  PIDS+=($!)
  port=$((port + 1))
done

say "Waiting for the nodes to register and publish their catalogs"
for _ in $(seq 150); do
  online=$("$CTL" --json nodes 2>/dev/null | grep -o '"online"' | wc -l || true)
  [ "$online" -ge "${#DEPTS[@]}" ] && break
  sleep 0.2
done
sleep 1
"$CTL" nodes

say "Search: 企业 登记 (Chinese full text, word segmentation)"
"$CTL" catalog search "企业 登记"
say "Search: conditional resources of commerce"
"$CTL" catalog search --provider commerce --share-type conditional
say "Search: everything in class 1 (base resources), first page"
"$CTL" catalog search --class 1 --page-size 5
say "Resolve: who provides 101001/000001 (企业登记信息), and where"
"$CTL" catalog resolve 101001/000001

cat <<INFO

gov-exchange is running.
  directory   127.0.0.1:$DIR_PORT      (log: $GX_HOME/logs/directory.log)
  nodes       tax 127.0.0.1:$BASE_PORT, commerce 127.0.0.1:$((BASE_PORT + 1)), quality 127.0.0.1:$((BASE_PORT + 2))
  state       $GX_HOME/data
  certificates $PKI   (CA, directory, and per department: node, operator, app)

Try, in another shell:
  export EXCHANGE_CA=$PKI/ca.crt EXCHANGE_CERT=$PKI/central-operator.crt EXCHANGE_KEY=$PKI/central-operator.key EXCHANGE_DIRECTORY=127.0.0.1:$DIR_PORT
  $CTL catalog search 纳税 信用
  $CTL catalog watch --from 0
  $CTL nodes --json

Press Ctrl-C to stop.
INFO
wait
