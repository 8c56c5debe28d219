#!/usr/bin/env bash
# PostgreSQL 15 on loopback for Dagster's storage (runs, events, schedules), without Docker: the
# native stack, CI and the Postgres test. The first start runs initdb into the data folder.
#
#   deploy/postgres.sh start    initdb (first time) and start; waits until it accepts connections
#   deploy/postgres.sh stop     fast shutdown
#   deploy/postgres.sh status   exit 0 when it accepts connections
#   deploy/postgres.sh env      the DAGSTER_PG_* settings of dagster.postgres.yaml: eval "$(deploy/postgres.sh env)"
#   deploy/postgres.sh check    exit 0 when the PostgreSQL binaries are installed (else 3)
#
# Settings (environment, defaults in brackets):
#   GCODEFP_PG_DIR [/tmp/gcodefp-postgres]   data folder, socket and log (owned by the server's user;
#                                            its parents must let that user through)
#   GCODEFP_PG_PORT [55432]                  listens on 127.0.0.1 only
#   GCODEFP_PG_BIN [/usr/lib/postgresql/15/bin, else pg_ctl on PATH]
# Database `dagster`, superuser `dagster`, password auth off (trust) on loopback: a disposable
# server for one machine, never one that others can reach. As root the server runs as the
# `postgres` user (initdb refuses root).
set -euo pipefail

DIR=${GCODEFP_PG_DIR:-/tmp/gcodefp-postgres}
PORT=${GCODEFP_PG_PORT:-55432}
HOST=127.0.0.1
BIN=${GCODEFP_PG_BIN:-/usr/lib/postgresql/15/bin}
[ -x "$BIN/pg_ctl" ] || BIN=$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/pg_ctl)")
DATA=$DIR/data

die() { echo "postgres: $*" >&2; exit 1; }

as_server_user() {  # run a command as the user that owns the server
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ready() { "$BIN/pg_isready" -q -h "$HOST" -p "$PORT" -d dagster -U dagster; }

start() {
  [ -x "$BIN/initdb" ] || die "PostgreSQL binaries not found (apt-get install postgresql-15, or set GCODEFP_PG_BIN)"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    mkdir -p "$DIR"
    [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
    chmod 700 "$DIR"
    as_server_user "$BIN/initdb" -D "$DATA" -U dagster --auth=trust -E UTF8 --no-instructions >"$DIR/initdb.log" 2>&1 \
      || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
  fi
  if ready; then echo "postgres: already running on $HOST:$PORT ($DATA)"; return; fi
  as_server_user "$BIN/pg_ctl" -D "$DATA" -l "$DIR/server.log" -w -t 60 \
    -o "-h $HOST -p $PORT -k $DIR -c fsync=off -c max_connections=100" start >/dev/null \
    || { tail -n 20 "$DIR/server.log" >&2; die "the server did not start (log: $DIR/server.log)"; }
  if ! "$BIN/psql" -h "$HOST" -p "$PORT" -U dagster -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='dagster'" \
      | grep -q 1; then
    "$BIN/createdb" -h "$HOST" -p "$PORT" -U dagster dagster
  fi
  echo "postgres: running on $HOST:$PORT, database dagster ($DATA)"
}

stop() {
  if [ ! -f "$DATA/postmaster.pid" ]; then echo "postgres: not running"; return; fi
  as_server_user "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null && echo "postgres: stopped"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) if ready; then echo "postgres: accepting connections on $HOST:$PORT"; else echo "postgres: down"; exit 1; fi ;;
  env) printf 'export DAGSTER_PG_HOST=%s DAGSTER_PG_PORT=%s DAGSTER_PG_DB=dagster DAGSTER_PG_USERNAME=dagster DAGSTER_PG_PASSWORD=dagster\n' \
         "$HOST" "$PORT" ;;
  check) [ -x "$BIN/initdb" ] || exit 3 ;;
  *) die "usage: $0 start|stop|status|env|check" ;;
esac
