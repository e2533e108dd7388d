#!/usr/bin/env bash
# A throw-away PostgreSQL server for tests, the benchmark and the quickstart: Debian's binaries
# (/usr/lib/postgresql/*/bin), a cluster in a temporary folder, listening on 127.0.0.1 only, on a free
# port, trust authentication for the superuser `postgres`. initdb refuses to run as root, so as root the
# server runs as the `postgres` system user (which Debian's package creates).
#
# Sourced (scripts/test.sh), it defines:
#   gx_pg_install            installs Debian's `postgresql` package if the binaries are missing (root or sudo)
#   gx_pg_start [SETTING...] starts a server; extra `name=value` settings go to postgresql.conf;
#                            sets and exports GX_PG_DIR and GX_TEST_POSTGRES_URL (a superuser URL)
#   gx_pg_stop               stops the server gx_pg_start started and removes its folder
# Run as a command:
#   scripts/postgres.sh start [SETTING...]   prints `export GX_PG_DIR=...` and `export GX_TEST_POSTGRES_URL=...`
#                                            (eval them); the server keeps running
#   scripts/postgres.sh stop DIR             stops the server in DIR and removes DIR
#
# Debian's package may create and start its own cluster on port 5432; nothing here uses or touches it.

gx_pg_bin() {
  local dir best=""
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/postgres" ] || continue
    if [ -z "$best" ] || [ "$(printf '%s\n%s\n' "$best" "$dir" | sort -V | tail -n 1)" = "$dir" ]; then
      best=$dir
    fi
  done
  [ -n "$best" ] && printf '%s\n' "$best"
}

gx_pg_install() {
  local bin
  if bin=$(gx_pg_bin); then
    echo "postgres: $("$bin/postgres" --version)"
    return 0
  fi
  local sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then
      sudo_cmd=sudo
    else
      echo "postgres: /usr/lib/postgresql/*/bin/postgres is missing and there is no root or sudo to install Debian's postgresql package" >&2
      return 1
    fi
  fi
  echo "postgres: installing Debian's postgresql package for the PostgreSQL store tests"
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  bin=$(gx_pg_bin) || { echo "postgres: the postgresql package installed no /usr/lib/postgresql/*/bin/postgres" >&2; return 1; }
  echo "postgres: $("$bin/postgres" --version)"
}

# Runs a command as the server's user: `postgres` when we are root, else ourselves.
gx_pg_as_owner() {
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
  else
    "$@"
  fi
}

gx_pg_start() {
  local bin
  bin=$(gx_pg_bin) || { echo "postgres: not installed (no /usr/lib/postgresql/*/bin/postgres); run gx_pg_install" >&2; return 1; }
  GX_PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gx-postgres.XXXXXX")
  export GX_PG_DIR
  if [ "$(id -u)" = 0 ]; then
    if ! id postgres >/dev/null 2>&1; then
      echo "postgres: running as root needs the 'postgres' system user (Debian's package creates it)" >&2
      return 1
    fi
    chown postgres: "$GX_PG_DIR"
  fi
  if ! gx_pg_as_owner "$bin/initdb" -D "$GX_PG_DIR/data" -U postgres --auth=trust --encoding=UTF8 --no-locale \
      >"$GX_PG_DIR/initdb.log" 2>&1; then
    echo "postgres: initdb failed:" >&2
    cat "$GX_PG_DIR/initdb.log" >&2
    return 1
  fi
  {
    echo "listen_addresses = '127.0.0.1'"
    # TCP only: no socket in /var/run/postgresql, so no clash with the package's own cluster.
    echo "unix_socket_directories = ''"
    echo "max_connections = 300"
    local setting
    for setting in "$@"; do
      echo "${setting%%=*} = '${setting#*=}'"
    done
  } | gx_pg_as_owner tee -a "$GX_PG_DIR/data/postgresql.conf" >/dev/null
  # A port that is free now may be taken before the server binds it: try a few.
  local attempt port
  for attempt in 1 2 3 4 5; do
    port=$(( 20000 + (RANDOM * 32768 + RANDOM) % 40000 ))
    if gx_pg_as_owner "$bin/pg_ctl" -D "$GX_PG_DIR/data" -l "$GX_PG_DIR/server.log" -o "-p $port" -w -t 60 start \
        >/dev/null 2>&1; then
      GX_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
      export GX_TEST_POSTGRES_URL
      echo "postgres: test server on 127.0.0.1:$port in $GX_PG_DIR"
      return 0
    fi
  done
  echo "postgres: the server did not start; its log:" >&2
  tail -n 30 "$GX_PG_DIR/server.log" >&2
  return 1
}

gx_pg_stop() {
  local dir=${1:-${GX_PG_DIR:-}}
  [ -n "$dir" ] && [ -d "$dir" ] || return 0
  local bin
  if bin=$(gx_pg_bin) && [ -f "$dir/data/postmaster.pid" ]; then
    gx_pg_as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
      gx_pg_as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  if [ "$dir" = "${GX_PG_DIR:-}" ]; then
    unset GX_PG_DIR GX_TEST_POSTGRES_URL
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    start)
      shift
      gx_pg_start "$@" >&2
      printf 'export GX_PG_DIR=%q\nexport GX_TEST_POSTGRES_URL=%q\n' "$GX_PG_DIR" "$GX_TEST_POSTGRES_URL"
      ;;
    stop)
      [ -n "${2:-}" ] || { echo "usage: $0 stop DIR" >&2; exit 2; }
      gx_pg_stop "$2"
      ;;
    install)
      gx_pg_install
      ;;
    *)
      echo "usage: $0 start [name=value ...] | stop DIR | install" >&2
      exit 2
      ;;
  esac
fi
