#!/usr/bin/env bash
# The docker-compose stack natively on loopback, without Docker: the API, Dagster (code server,
# webserver, daemon) and a real Prometheus (Debian's `prometheus` package) scraping the API.
#
#   deploy/stack.sh start  [SERVICE...]   start (all by default) and wait until each answers
#   deploy/stack.sh stop   [SERVICE...]   stop (process group: TERM, then KILL after 20 s)
#   deploy/stack.sh status [SERVICE...]   running or not, pid, URL (exit 1 if any is stopped)
#   deploy/stack.sh command SERVICE       print the service's command, one word per line
#
# SERVICE: postgres, api, code-server, dagster-webserver, dagster-daemon, prometheus, or `dagster`
# (postgres and the three Dagster ones). The commands are the containers' commands
# (Dockerfile.inference, docker-compose.yml) with 127.0.0.1 and the ports below. With the postgres
# service (deploy/postgres.sh: initdb + pg_ctl on loopback, data in $GCODEFP_STACK_DIR/postgres) the
# Dagster services run on the Postgres instance of deploy/dagster/dagster.postgres.yaml, in
# DAGSTER_HOME [$GCODEFP_STACK_DIR/dagster_home]; without it, on SQLite. Settings (environment,
# defaults in brackets):
#   GCODEFP_REGISTRY [artifacts/registry]      GCODEFP_API_PORT [8000]   GCODEFP_API_WORKERS [2]
#   DAGSTER_PORT [3000]   DAGSTER_CODE_SERVER_PORT [4000]   PROMETHEUS_PORT [9090]
#   DAGSTER_HOME [.dagster_home, the one `gcodefp pipeline` uses]   GCODEFP_CONFIG [configs/quickstart.json]
#   GCODEFP_ADMIN_TOKEN [generated once into $GCODEFP_STACK_DIR/admin_token]
#   GCODEFP_STACK_DIR [artifacts/stack: pids, logs, Prometheus data]   GCODEFP_BIN [.venv/bin]
#   POSTGRES_PORT [55432]
#   PROMETHEUS_BIN [prometheus on PATH]   GCODEFP_STACK_TIMEOUT [120 s per service]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=${GCODEFP_STACK_DIR:-$REPO/artifacts/stack}
BIN=${GCODEFP_BIN:-$REPO/.venv/bin}
HOST=127.0.0.1
API_PORT=${GCODEFP_API_PORT:-8000}
API_WORKERS=${GCODEFP_API_WORKERS:-2}
DAGSTER_PORT=${DAGSTER_PORT:-3000}
CODE_SERVER_PORT=${DAGSTER_CODE_SERVER_PORT:-4000}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
REGISTRY=${GCODEFP_REGISTRY:-$REPO/artifacts/registry}
TIMEOUT=${GCODEFP_STACK_TIMEOUT:-120}
POSTGRES_PORT=${POSTGRES_PORT:-55432}
ALL=(postgres api code-server dagster-webserver dagster-daemon prometheus)

die() { echo "stack: $*" >&2; exit 1; }

services() {  # the arguments, `dagster` expanded, in start order; all when none given
  local want=("$@") out=() s
  [ ${#want[@]} -eq 0 ] && want=("${ALL[@]}")
  for s in "${want[@]}"; do
    case $s in
      dagster) out+=(postgres code-server dagster-webserver dagster-daemon) ;;
      postgres|api|code-server|dagster-webserver|dagster-daemon|prometheus) out+=("$s") ;;
      *) die "unknown service '$s' (postgres, api, code-server, dagster-webserver, dagster-daemon, prometheus, dagster)" ;;
    esac
  done
  for s in "${ALL[@]}"; do if [[ " ${out[*]} " == *" $s "* ]]; then echo "$s"; fi; done
}

pid_of() { cat "$STACK_DIR/pids/$1" 2>/dev/null || true; }
running() {
  if [ "$1" = postgres ]; then pg status >/dev/null 2>&1; return; fi
  local pid; pid=$(pid_of "$1"); [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}
# deploy/postgres.sh with this stack's folder and port (pg_ctl runs the server as its own daemon)
pg() { GCODEFP_PG_DIR="$STACK_DIR/postgres" GCODEFP_PG_PORT="$POSTGRES_PORT" "$REPO/deploy/postgres.sh" "$@"; }

url_of() {
  case $1 in
    api) echo "http://$HOST:$API_PORT" ;;
    code-server) echo "grpc://$HOST:$CODE_SERVER_PORT" ;;
    dagster-webserver) echo "http://$HOST:$DAGSTER_PORT" ;;
    prometheus) echo "http://$HOST:$PROMETHEUS_PORT" ;;
    postgres) echo "postgresql://dagster@$HOST:$POSTGRES_PORT/dagster" ;;
    *) echo "-" ;;
  esac
}

# Exit 0 when the service answers: HTTP 200 on its probe path, or (code server) an open port.
probe() {
  local path
  case $1 in
    api) path=/health ;; dagster-webserver) path=/server_info ;; prometheus) path=/-/ready ;;
    code-server) "$BIN/python" -c "import socket, sys; socket.create_connection(('$HOST', $CODE_SERVER_PORT), 2)" \
                   2>/dev/null; return ;;
    *) return 0 ;;
  esac
  "$BIN/python" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('$(url_of "$1")$path', timeout=2).status != 200)" 2>/dev/null
}

port_of() {
  case $1 in
    api) echo "$API_PORT" ;; code-server) echo "$CODE_SERVER_PORT" ;; dagster-webserver) echo "$DAGSTER_PORT" ;;
    prometheus) echo "$PROMETHEUS_PORT" ;; *) echo "" ;;
  esac
}

admin_token() {
  if [ -n "${GCODEFP_ADMIN_TOKEN:-}" ]; then echo "$GCODEFP_ADMIN_TOKEN"; return; fi
  if [ ! -s "$STACK_DIR/admin_token" ]; then
    (umask 077 && "$BIN/python" -c "import secrets; print(secrets.token_hex(16))" > "$STACK_DIR/admin_token.tmp")
    mv "$STACK_DIR/admin_token.tmp" "$STACK_DIR/admin_token"
  fi
  cat "$STACK_DIR/admin_token"
}

command_of() {  # the service's argv, one word per line (the containers' commands, on loopback)
  case $1 in
    api) printf '%s\n' "$BIN/gcodefp" serve --host "$HOST" --port "$API_PORT" --workers "$API_WORKERS" ;;
    code-server) printf '%s\n' "$BIN/dagster" code-server start -h "$HOST" -p "$CODE_SERVER_PORT" \
                   -m gcodefp_dagster.definitions -a defs --location-name gcodefp ;;
    dagster-webserver) printf '%s\n' "$BIN/dagster-webserver" -h "$HOST" -p "$DAGSTER_PORT" \
                         -w deploy/dagster/workspace.grpc.yaml ;;
    dagster-daemon) printf '%s\n' "$BIN/dagster-daemon" run -w deploy/dagster/workspace.grpc.yaml ;;
    prometheus) printf '%s\n' "${PROMETHEUS_BIN:-prometheus}" "--config.file=$STACK_DIR/prometheus.yml" \
                  "--storage.tsdb.path=$STACK_DIR/prometheus-data" "--web.listen-address=$HOST:$PROMETHEUS_PORT" ;;
  esac
}

prepare() {  # files a service needs before it starts
  case $1 in
    api) mkdir -p "$REGISTRY" ;;
    code-server|dagster-webserver|dagster-daemon)
      mkdir -p "$DAGSTER_HOME"
      if running postgres; then  # the deployment's Postgres instance, its folders moved into DAGSTER_HOME
        sed "s#/opt/dagster/dagster_home#$DAGSTER_HOME#g" "$REPO/deploy/dagster/dagster.postgres.yaml" \
          > "$DAGSTER_HOME/dagster.yaml.tmp" && mv "$DAGSTER_HOME/dagster.yaml.tmp" "$DAGSTER_HOME/dagster.yaml"
      elif [ ! -f "$DAGSTER_HOME/dagster.yaml" ]; then
        cp "$REPO/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"
      fi ;;
    prometheus)
      command -v "${PROMETHEUS_BIN:-prometheus}" >/dev/null \
        || die "prometheus not found (apt-get install -y prometheus, or set PROMETHEUS_BIN)"
      # The repository's native scrape config with this stack's ports.
      sed -e "s/127\.0\.0\.1:8000/$HOST:$API_PORT/" -e "s/127\.0\.0\.1:9090/$HOST:$PROMETHEUS_PORT/" \
        "$REPO/deploy/prometheus/prometheus.native.yml" > "$STACK_DIR/prometheus.yml.tmp"
      mv "$STACK_DIR/prometheus.yml.tmp" "$STACK_DIR/prometheus.yml"
      cp "$REPO/deploy/prometheus/alerts.yml" "$STACK_DIR/alerts.yml" ;;  # rule_files is relative to the config
  esac
}

start_one() {
  local name=$1 port argv=() pid deadline
  if [ "$name" = postgres ]; then pg start; return; fi
  if running "$name"; then echo "$name: already running (pid $(pid_of "$name"))"; return; fi
  port=$(port_of "$name")
  if [ -n "$port" ] && "$BIN/python" -c "import socket; socket.create_connection(('$HOST', $port), 1)" 2>/dev/null; then
    die "$name: port $port is taken by another process (set its port variable, see deploy/stack.sh)"
  fi
  prepare "$name"
  mapfile -t argv < <(command_of "$name")
  # Job control: each service is its own process group (pid = pgid), so stop reaches its workers and
  # run subprocesses; without it, background jobs ignore SIGINT, which Dagster uses to shut down children.
  set -m
  (cd "$REPO" && exec "${argv[@]}") > "$STACK_DIR/logs/$name.log" 2>&1 &
  pid=$!
  set +m
  echo "$pid" > "$STACK_DIR/pids/$name"
  deadline=$((SECONDS + TIMEOUT))
  until probe "$name"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$STACK_DIR/logs/$name.log" >&2 || true
      die "$name exited during start (log: $STACK_DIR/logs/$name.log)"
    fi
    [ $SECONDS -lt $deadline ] || die "$name did not answer within ${TIMEOUT}s (log: $STACK_DIR/logs/$name.log)"
    sleep 0.5
  done
  [ "$name" = dagster-daemon ] && { sleep 3; kill -0 "$pid" 2>/dev/null || die "dagster-daemon exited (log: $STACK_DIR/logs/$name.log)"; }
  echo "$name: started (pid $pid) $(url_of "$name")  log $STACK_DIR/logs/$name.log"
}

stop_one() {
  local name=$1 pid deadline
  if [ "$name" = postgres ]; then pg stop; return; fi
  pid=$(pid_of "$name")
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then rm -f "$STACK_DIR/pids/$name"; echo "$name: not running"; return; fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + 20))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    echo "$name: killed (did not stop within 20 s)"
  else
    kill -KILL -- "-$pid" 2>/dev/null || true  # leftovers of its group (e.g. a run's subprocess)
    echo "$name: stopped"
  fi
  rm -f "$STACK_DIR/pids/$name"
}

main() {
  local action=${1:-} names s
  [ $# -gt 0 ] && shift
  names=$(services "$@")
  # With the postgres service (asked for, or already running): its own DAGSTER_HOME on that server.
  if [[ " $(echo $names) " == *" postgres "* ]] || running postgres; then
    export DAGSTER_HOME=${DAGSTER_HOME:-$STACK_DIR/dagster_home}
    eval "$(pg env)"
  fi
  export DAGSTER_HOME=${DAGSTER_HOME:-$REPO/.dagster_home}
  unset PROMETHEUS_MULTIPROC_DIR  # `gcodefp serve` makes its own
  export GCODEFP_REGISTRY=$REGISTRY WANDB_MODE=${WANDB_MODE:-offline}
  export GCODEFP_CONFIG=${GCODEFP_CONFIG:-configs/quickstart.json}
  export GCODEFP_API_URL="http://$HOST:$API_PORT"
  export DAGSTER_CODE_SERVER_HOST=$HOST DAGSTER_CODE_SERVER_PORT=$CODE_SERVER_PORT
  case $action in
    start)
      mkdir -p "$STACK_DIR/pids" "$STACK_DIR/logs"
      [ -x "$BIN/gcodefp" ] || die "no $BIN/gcodefp: install the project first (see README) or set GCODEFP_BIN"
      GCODEFP_ADMIN_TOKEN=$(admin_token); export GCODEFP_ADMIN_TOKEN
      for s in $names; do start_one "$s"; done
      echo "stack: up. Admin token: ${GCODEFP_ADMIN_TOKEN:0:4}... ($STACK_DIR/admin_token unless set). Stop: $0 stop" ;;
    stop)
      for s in $(echo "$names" | tac); do stop_one "$s"; done ;;
    status)
      local down=0
      for s in $names; do
        if running "$s"; then printf '%-18s running  pid %-7s %s\n' "$s" "$(pid_of "$s")" "$(url_of "$s")"
        else printf '%-18s stopped\n' "$s"; down=1; fi
      done
      return $down ;;
    command)  # the argv a service runs, one word per line (tests compare it with the containers' commands)
      [ "$(echo "$names" | wc -l)" -eq 1 ] && [ $# -eq 1 ] || die "usage: $0 command SERVICE"
      command_of "$names" ;;
    *) die "usage: $0 start|stop|status|command [postgres|api|code-server|dagster-webserver|dagster-daemon|prometheus|dagster ...]" ;;
  esac
}

main "$@"
