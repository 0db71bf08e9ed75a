#!/usr/bin/env bash
# `make run`: the whole stack in the foreground; Ctrl-C (or a SIGTERM to make) stops all of it
# (SPEC 2): the app processes, and the PostgreSQL and Redis servers this run started. Servers that
# were already running when it began (a `make up` stack, a test run) are left running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

before=$(scripts/services.sh status)
honcho=""

stop_all_of_it() {
  trap '' INT TERM # a second Ctrl-C must not cut the clean-up short
  if [ -n "$honcho" ] && kill -0 "$honcho" 2>/dev/null; then
    kill -TERM "$honcho" 2>/dev/null || true
    wait "$honcho" 2>/dev/null || true
  fi
  grep -q "postgres: up" <<<"$before" || scripts/services.sh stop-pg
  grep -q "redis: up" <<<"$before" || scripts/services.sh stop-redis
  echo "stopped"
}
trap stop_all_of_it EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

scripts/services.sh ensure
$PY manage.py migrate --noinput -v 0
$PY manage.py seed_sandbox
$PY manage.py seed_demo_merchant
echo "Starting web :8000, sandbox :8001, workers, beat (Ctrl-C stops all, PostgreSQL and Redis too)"
rm -rf .run/prometheus
# In the background so that this shell's traps run as soon as a signal arrives; honcho then
# stops its processes on the SIGTERM the clean-up sends it.
.venv/bin/honcho -f Procfile start &
honcho=$!
wait "$honcho"
