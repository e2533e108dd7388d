#!/bin/sh
# One-shot PKI for the compose set-up: a CA and the certificates of the directory and each department's
# node, operator and application, written to $PKI_DIR (default /etc/gov-exchange/pki). Certificates that
# already exist are kept, so running it again (every `docker compose up`) changes nothing.
#
# The CA key ends up beside the servers' keys, which suits a trial on one machine only: in production the
# CA stays offline and each server receives just its own key (docs/OPERATOR-GUIDE.md, "PKI set-up").
set -eu
PKI_DIR=${PKI_DIR:-/etc/gov-exchange/pki}
DEPARTMENTS=${DEPARTMENTS:-tax commerce quality}

mkdir -p "$PKI_DIR"
if [ -f "$PKI_DIR/ca.crt" ]; then
  echo "CA kept: $PKI_DIR/ca.crt"
else
  exchangectl pki init --dir "$PKI_DIR" >/dev/null
  echo "CA created: $PKI_DIR/ca.crt"
fi

# issue NAME ARGS...: issues NAME unless NAME.crt is there.
issue() {
  name=$1
  shift
  if [ -f "$PKI_DIR/$name.crt" ]; then
    echo "kept $name"
  else
    exchangectl pki issue --dir "$PKI_DIR" --name "$name" "$@" >/dev/null
    echo "issued $name"
  fi
}

# Servers are reached by their compose service names, so those go into the certificates.
issue directory --dept central --role directory --host directory
issue central-operator --dept central --role operator
for dept in $DEPARTMENTS; do
  issue "$dept-node" --dept "$dept" --role node --host "$dept"
  issue "$dept-operator" --dept "$dept" --role operator
  issue "$dept-app" --dept "$dept" --role app
done
