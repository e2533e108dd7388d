#!/bin/sh
# One-shot PKI for the compose set-ups: a CA and the certificates of the directory and each department's
# node, operator and application, written to $PKI_DIR (default /etc/gov-exchange/pki). Certificates that
# already exist are kept, so running it again (every `docker compose up`) changes nothing.
#
#   PKI_DIR           where the CA and certificates go
#   DEPARTMENTS       the departments that get a node, operator and application certificate
#   DIRECTORY_HOSTS   the names the directory is reached by (default `directory`); with several replicas
#                     (compose-ha.yaml) every replica's name, as they all present the one certificate
#   DB_PASSWORD_FILE  if set, a random password for the directory's PostgreSQL database is written there
#                     (mode 0600) unless the file exists
#
# The CA key ends up beside the servers' keys, which suits a trial on one machine only: in production the
# CA stays offline and each server receives just its own key (docs/OPERATOR-GUIDE.md, "PKI set-up").
set -eu
PKI_DIR=${PKI_DIR:-/etc/gov-exchange/pki}
DEPARTMENTS=${DEPARTMENTS:-tax commerce quality}
DIRECTORY_HOSTS=${DIRECTORY_HOSTS:-directory}
DB_PASSWORD_FILE=${DB_PASSWORD_FILE:-}

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
directory_hosts=""
for host in $DIRECTORY_HOSTS; do
  directory_hosts="$directory_hosts --host $host"
done
# shellcheck disable=SC2086 # one word per --host flag
issue directory --dept central --role directory $directory_hosts
issue central-operator --dept central --role operator
for dept in $DEPARTMENTS; do
  issue "$dept-node" --dept "$dept" --role node --host "$dept"
  issue "$dept-operator" --dept "$dept" --role operator
  issue "$dept-app" --dept "$dept" --role app
done

if [ -n "$DB_PASSWORD_FILE" ]; then
  if [ -f "$DB_PASSWORD_FILE" ]; then
    echo "database password kept: $DB_PASSWORD_FILE"
  else
    mkdir -p "$(dirname "$DB_PASSWORD_FILE")"
    # 32 random bytes as hex: nothing in it needs quoting in a connection string or a shell. No final
    # newline, so no reader can take it for part of the password.
    password=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    # Written beside the target and renamed, so a reader never sees a half-written password.
    (umask 077 && printf '%s' "$password" >"$DB_PASSWORD_FILE.tmp")
    mv "$DB_PASSWORD_FILE.tmp" "$DB_PASSWORD_FILE"
    echo "database password created: $DB_PASSWORD_FILE"
  fi
fi
