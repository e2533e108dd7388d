#!/usr/bin/env bash
# Starts a local gov-exchange: a directory and four department nodes (tax, commerce, quality, police) on
# embedded sled stores, with a freshly generated PKI; publishes the sample catalogs in deploy/local/catalog/,
# loads the sample records in deploy/local/records/, shows searches, record exchange (unconditional,
# conditional with a grant, a population record with the identity number masked), a push subscription
# with a bulk sync and a deregistration event, and the audit trail, and keeps running until Ctrl-C.
#
# State (PKI, configs, stores, logs) goes to $GX_HOME (default ./.quickstart), wiped at each start.
# Ports: directory $GX_DIRECTORY_PORT (7400), nodes 7401-7404 (override with GX_BASE_PORT); admin ports
# (metrics, health, web console) directory 9400, nodes 9401-9404 (override with GX_ADMIN_BASE_PORT).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
GX_HOME=${GX_HOME:-$ROOT/.quickstart}
DIR_PORT=${GX_DIRECTORY_PORT:-7400}
BASE_PORT=${GX_BASE_PORT:-7401}
ADMIN_BASE_PORT=${GX_ADMIN_BASE_PORT:-9400}
DEPTS=(tax commerce quality police)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Building (debug profile, shared with the tests)"
cargo build --workspace --bins --quiet
BIN=$ROOT/target/debug
CTL=$BIN/exchangectl

for port in "$DIR_PORT" $(seq "$BASE_PORT" $((BASE_PORT + ${#DEPTS[@]} - 1))) $(seq "$ADMIN_BASE_PORT" $((ADMIN_BASE_PORT + ${#DEPTS[@]}))); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use (another quickstart running?). Set GX_DIRECTORY_PORT / GX_BASE_PORT / GX_ADMIN_BASE_PORT." >&2
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
# The admin ports' bearer token (for the web console in a browser; exchangectl uses operator certificates).
TOKEN_FILE=$GX_HOME/config/admin.token
(umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$TOKEN_FILE")

cat > "$GX_HOME/config/directory.toml" <<TOML
listen = "127.0.0.1:$DIR_PORT"
data_dir = "$GX_HOME/data/directory"
lease_ttl_seconds = 15

[tls]
ca = "$PKI/ca.crt"
cert = "$PKI/directory.crt"
key = "$PKI/directory.key"

[admin]
listen = "127.0.0.1:$ADMIN_BASE_PORT"
token_file = "$TOKEN_FILE"
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

export EXCHANGE_PKI_DIR=$PKI EXCHANGE_IDENTITY=central-operator EXCHANGE_DIRECTORY=127.0.0.1:$DIR_PORT
# `as NAME NODE-DEPT args...`: exchangectl as certificate NAME, talking to NODE-DEPT's node.
declare -A NODE_PORT ADMIN_PORT
port=$BASE_PORT
for d in "${DEPTS[@]}"; do NODE_PORT[$d]=$port; ADMIN_PORT[$d]=$((ADMIN_BASE_PORT + port - BASE_PORT + 1)); port=$((port + 1)); done
as() { local who=$1 dept=$2; shift 2; "$CTL" --identity "$who" --node "127.0.0.1:${NODE_PORT[$dept]}" "$@"; }
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

[admin]
listen = "127.0.0.1:${ADMIN_PORT[$d]}"
token_file = "$TOKEN_FILE"
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

say "Records: commerce and police load their records into their own nodes (前置库)"
as commerce-app commerce records put --resource 101001/000001 --file "$ROOT/deploy/local/records/commerce-enterprises.json"
as commerce-app commerce records put --resource 302001/000001 --file "$ROOT/deploy/local/records/commerce-penalties.json"
as police-app police records put --resource 102001/000001 --file "$ROOT/deploy/local/records/police-population.json"

say "Tax reads commerce's enterprise registration (unconditional) by credit code, through its own node"
as tax-app tax records get --resource 101001/000001 91350100M000100Y43 --purpose "纳税人登记信息核对"

say "Quality asks for commerce's administrative penalties (conditional): refused, no grant yet"
as quality-app quality records get --resource 302001/000001 91350100M000100Y43 --purpose "抽查对象信用核查" || true

say "Quality requests access; commerce approves fewer items than asked"
GRANT=$(as quality-app quality --json grants request --resource 302001/000001 \
  --items 统一社会信用代码,当事人名称,处罚种类,罚没金额 \
  --purpose "产品质量监督抽查对象信用核查" --legal-basis "《中华人民共和国产品质量法》第十五条" \
  | sed -n 's/.*"grant_id": *"\(G[0-9]*\)".*/\1/p' | head -1)
as commerce-operator commerce grants list --side provider --status pending
as commerce-operator commerce grants approve "$GRANT" --items 统一社会信用代码,当事人名称,处罚种类
sleep 1

say "Quality asks again: served, with only the granted items (罚没金额 never leaves commerce)"
as quality-app quality records get --resource 302001/000001 91350100M000100Y43 --purpose "抽查对象信用核查"

say "Tax asks police for a population record; police grants name, sex and birth date only"
PGRANT=$(as tax-app tax --json grants request --resource 102001/000001 --items 姓名,性别,出生日期 \
  --purpose "个人所得税汇算清缴身份核验" --legal-basis "《中华人民共和国个人所得税法》第十五条" \
  | sed -n 's/.*"grant_id": *"\(G[0-9]*\)".*/\1/p' | head -1)
as police-operator police grants approve "$PGRANT" >/dev/null
sleep 1
say "The identity number leaves police masked (not granted in full)"
as tax-app tax records get --resource 102001/000001 11010519491231002X --purpose "个人所得税汇算清缴身份核验"

say "Push: tax subscribes to commerce's enterprise registration, then takes a bulk sync of it"
as tax-app tax events subscribe --resource 101001/000001
as tax-app tax records sync --resource 101001/000001 --out "$GX_HOME/tax-enterprises.jsonl" --purpose "纳税人登记信息初始化"

say "Commerce deregisters an enterprise: the change reaches tax's node without tax asking"
as commerce-app commerce events publish --resource 101001/000001 --kind deregistered \
  --file "$ROOT/deploy/local/records/commerce-deregistration.json"
sleep 1
as tax-app tax events receive --resource 101001/000001
as commerce-operator commerce events list

say "Commerce's audit trail: every relayed request, keys only as keyed hashes"
as commerce-operator commerce audit query --limit 10
as commerce-operator commerce audit verify

say "Commerce's node at a glance, from its admin port (operator certificate): exchangectl status and peers"
as commerce-operator commerce --admin "127.0.0.1:${ADMIN_PORT[commerce]}" status --interval-ms 300
as commerce-operator commerce --admin "127.0.0.1:${ADMIN_PORT[commerce]}" peers

cat <<INFO

gov-exchange is running.
  directory    127.0.0.1:$DIR_PORT      (log: $GX_HOME/logs/directory.log)
  nodes        tax 127.0.0.1:${NODE_PORT[tax]}, commerce 127.0.0.1:${NODE_PORT[commerce]}, quality 127.0.0.1:${NODE_PORT[quality]}, police 127.0.0.1:${NODE_PORT[police]}
  consoles     https://127.0.0.1:${ADMIN_PORT[commerce]}/ (commerce; tax ${ADMIN_PORT[tax]}, quality ${ADMIN_PORT[quality]}, police ${ADMIN_PORT[police]}, directory $ADMIN_BASE_PORT)
               token: $(cat "$TOKEN_FILE")   (the browser warns about the certificate: it is signed by $PKI/ca.crt)
  metrics      https://127.0.0.1:${ADMIN_PORT[commerce]}/metrics   health /healthz /readyz
  state        $GX_HOME/data   (logs: $GX_HOME/logs)
  certificates $PKI   (CA, directory, central-operator, and per department: node, operator, app)

Try, in another shell:
  export EXCHANGE_PKI_DIR=$PKI EXCHANGE_DIRECTORY=127.0.0.1:$DIR_PORT
  $CTL --identity central-operator catalog search 纳税 信用
  $CTL --identity tax-app --node 127.0.0.1:${NODE_PORT[tax]} records get --resource 101001/000001 91440300MA5F123452
  $CTL --identity commerce-operator --node 127.0.0.1:${NODE_PORT[commerce]} grants list
  $CTL --identity tax-operator --node 127.0.0.1:${NODE_PORT[tax]} audit query --since 10m
  $CTL --identity tax-app --node 127.0.0.1:${NODE_PORT[tax]} events receive --resource 101001/000001 --follow
  $CTL --identity commerce-operator --admin 127.0.0.1:${ADMIN_PORT[commerce]} top
  $CTL --identity commerce-operator --admin 127.0.0.1:${ADMIN_PORT[commerce]} outbox

Press Ctrl-C to stop.
INFO
wait
