#!/bin/sh
# Issues the certificates deploy/kubernetes needs, with the cluster's Service names as hosts, and copies
# what the Secrets hold (ca.crt and each server's certificate and key, never ca.key) into ./pki/ for
# kustomization.yaml's secretGenerator.
#
#   ./issue-certs.sh CA_DIR [NAMESPACE]
#
# CA_DIR holds ca.crt and ca.key (`exchangectl pki init --dir CA_DIR`); the certificates are issued there
# too, as `exchangectl pki issue` does. Certificates already in CA_DIR are reused, not reissued: a
# directory certificate issued before the gx-directory-replicas names were added lacks them (move
# CA_DIR/directory.crt and .key aside and run this again before applying ../kubernetes-ha).
set -eu
if [ $# -lt 1 ]; then
  echo "usage: $0 CA_DIR [NAMESPACE]" >&2
  exit 2
fi
CA_DIR=$1
NS=${2:-gov-exchange}
OUT=$(cd "$(dirname "$0")" && pwd)/pki
EXCHANGECTL=${EXCHANGECTL:-exchangectl}

if [ ! -f "$CA_DIR/ca.crt" ] || [ ! -f "$CA_DIR/ca.key" ]; then
  echo "$CA_DIR has no CA (ca.crt and ca.key): run \`exchangectl pki init --dir $CA_DIR\` first" >&2
  exit 1
fi

# issue NAME DEPT ROLE HOST...
issue() {
  name=$1 dept=$2 role=$3
  shift 3
  if [ -f "$CA_DIR/$name.crt" ]; then
    echo "reusing $CA_DIR/$name.crt"
    return
  fi
  hosts=""
  for h in "$@"; do hosts="$hosts --host $h"; done
  # shellcheck disable=SC2086 # one word per --host flag
  "$EXCHANGECTL" pki issue --dir "$CA_DIR" --dept "$dept" --role "$role" --name "$name" $hosts >/dev/null
  echo "issued $name"
}

# gx-directory-replicas is the headless Service of the highly available variant (../kubernetes-ha); every replica
# presents this one certificate, whichever of the two names a client dialled.
issue directory central directory \
  "gx-directory" "gx-directory.$NS" "gx-directory.$NS.svc" "gx-directory.$NS.svc.cluster.local" \
  "gx-directory-replicas" "gx-directory-replicas.$NS" "gx-directory-replicas.$NS.svc" \
  "gx-directory-replicas.$NS.svc.cluster.local"
issue tax-node tax node \
  "gx-node-tax.$NS.svc" "gx-node-tax.$NS.svc.cluster.local" "gx-node-tax-0.gx-node-tax.$NS.svc.cluster.local"

mkdir -p "$OUT"
chmod 0700 "$OUT"
for f in ca.crt directory.crt directory.key tax-node.crt tax-node.key; do
  install -m 0600 "$CA_DIR/$f" "$OUT/$f"
done
echo "wrote $OUT (ca.crt, directory.crt/.key, tax-node.crt/.key)"
