#!/bin/sh
# Writes a random password for the directory's database to secrets/db-password (mode 0600) beside this
# script, for kustomization.yaml's secretGenerator. An existing file is kept: the trial PostgreSQL reads
# the password only when it creates its database, so a new one would lock the directories out.
#
#   ./db-password.sh
#
# With your own PostgreSQL, put its role's password in secrets/db-password instead of running this.
set -eu
OUT=$(cd "$(dirname "$0")" && pwd)/secrets
mkdir -p "$OUT"
chmod 0700 "$OUT"
if [ -f "$OUT/db-password" ]; then
  echo "kept $OUT/db-password"
  exit 0
fi
# 32 random bytes as hex, without a final newline (the Secret's value is the file's bytes).
password=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
(umask 077 && printf '%s' "$password" >"$OUT/db-password.tmp")
mv "$OUT/db-password.tmp" "$OUT/db-password"
echo "wrote $OUT/db-password"
