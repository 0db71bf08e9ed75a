#!/usr/bin/env bash
# Owns the embedded PostgreSQL and Redis under .run/: install (Debian packages), init, start, stop.
# Usage: scripts/services.sh {ensure|ensure-test|start|stop|stop-pg|stop-redis|status}
# (ensure-test: also installs rabbitmq-server, which tests/scale runs a node of)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN="$ROOT/.run"
PG_PORT=${PG_PORT:-55432}
REDIS_PORT=${REDIS_PORT:-56379}
REDIS_DIR="$RUN/redis"
mkdir -p "$RUN/log" "$RUN/pids"

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

ensure_packages() {
  local missing=()
  [ -n "$(pg_bindir)" ] || missing+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  # The scale tests (tests/scale) start a RabbitMQ node of their own; the stack itself does not.
  if [ "${1:-}" = test ]; then [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server); fi
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "Installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The Debian package starts its own cluster on 5432; we run our own, so stop it.
    if command -v pg_ctlcluster >/dev/null 2>&1; then service postgresql stop >/dev/null 2>&1 || true; fi
    service redis-server stop >/dev/null 2>&1 || true
    service rabbitmq-server stop >/dev/null 2>&1 || true
  else
    echo "Missing: ${missing[*]}. Install them with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
}

# PostgreSQL refuses to run as root: when we are root, the cluster belongs to 'postgres'.
as_pg() {
  # From /: postgres may not be allowed into the checkout we run from.
  if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# Where the cluster lives. As root, PostgreSQL runs as 'postgres', which must be able to walk
# every directory down to its data: a checkout under /root or in a 0700 folder is closed to it.
# Then the cluster goes under postgres's own home instead, one directory per checkout and port
# (tests/faults/servers.py picks the same way), and .run/pg is a symlink to it for humans.
pg_home() {
  if [ "$(id -u)" != 0 ] || runuser -u postgres -- test -x "$RUN" 2>/dev/null; then
    echo "$RUN"
  else
    local key; key=$(printf '%s' "$ROOT" | sha1sum | cut -c1-12)
    echo "$(getent passwd postgres | cut -d: -f6)/payments-dev/$key-$PG_PORT"
  fi
}

pg_running() { "$(pg_bindir)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

start_pg() {
  local bin; bin=$(pg_bindir)
  PG_HOME=$(pg_home); PG_DATA="$PG_HOME/pg"; PG_LOG="$PG_HOME/log/postgres.log"
  if [ "$PG_HOME" != "$RUN" ]; then
    mkdir -p "$PG_HOME/log" && chown postgres: "$PG_HOME" "$PG_HOME/log" && chmod 700 "$PG_HOME"
    ln -sfn "$PG_DATA" "$RUN/pg"; ln -sfn "$PG_LOG" "$RUN/log/postgres.log"
  fi
  if [ ! -s "$PG_DATA/PG_VERSION" ]; then
    mkdir -p "$PG_DATA"
    [ "$(id -u)" = 0 ] && chown -R postgres: "$PG_DATA" && chmod 700 "$PG_DATA"
    as_pg "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$RUN/log/initdb.log"
    cat >>"$PG_DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DATA'
max_connections = 300
shared_buffers = 256MB
synchronous_commit = on
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
CONF
  fi
  if ! pg_running; then
    [ "$(id -u)" = 0 ] && chown -R postgres: "$PG_DATA"
    [ -e "$PG_LOG" ] || touch "$PG_LOG"; [ "$(id -u)" = 0 ] && chown postgres: "$PG_LOG"
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null
  fi
  local psql=("$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qtA)
  "${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='payments'" | grep -q 1 ||
    "${psql[@]}" -c "CREATE ROLE payments LOGIN SUPERUSER"
  for db in payments sandbox; do
    "${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 ||
      "${psql[@]}" -c "CREATE DATABASE $db OWNER payments"
  done
}

redis_running() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; }

start_redis() {
  mkdir -p "$REDIS_DIR"
  if ! redis_running; then
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_DIR" \
      --appendonly yes --daemonize yes --pidfile "$RUN/pids/redis.pid" \
      --logfile "$RUN/log/redis.log" --save "" >/dev/null
    for _ in $(seq 1 50); do redis_running && break; sleep 0.1; done
    redis_running || { echo "redis did not start; see $RUN/log/redis.log" >&2; exit 1; }
  fi
}

stop_pg() {
  local bin; bin=$(pg_bindir)
  if [ -n "$bin" ] && pg_running; then as_pg "$bin/pg_ctl" -D "$(pg_home)/pg" -m fast -w stop >/dev/null || true; fi
}

stop_redis() {
  if redis_running; then redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true; fi
}

stop_all() { stop_pg; stop_redis; }

case "${1:-ensure}" in
  ensure) ensure_packages; start_pg; start_redis ;;
  ensure-test) ensure_packages test; start_pg; start_redis ;;
  start) start_pg; start_redis ;;
  stop) stop_all ;;
  stop-pg) stop_pg ;;
  stop-redis) stop_redis ;;
  status) pg_running && echo "postgres: up" || echo "postgres: down"; redis_running && echo "redis: up" || echo "redis: down" ;;
  *) echo "usage: $0 {ensure|ensure-test|start|stop|status}" >&2; exit 2 ;;
esac
