#!/usr/bin/env bash
# Runs the Procfile's processes in the background with pid files: `up` (idempotent), `down`, `status`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dev stack runs the local settings unless told otherwise (the entry points default to production).
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-config.settings.local}"
RUN=.run
mkdir -p "$RUN/log" "$RUN/pids"
PORT=${WEB_BIND:-127.0.0.1:8000}

alive() { [ -f "$RUN/pids/$1.pid" ] && kill -0 "$(cat "$RUN/pids/$1.pid")" 2>/dev/null; }

procs() { grep -E '^[a-z-]+:' Procfile | sed -E 's/^([a-z-]+):[[:space:]]*(.*)$/\1\t\2/'; }

up() {
  # Metrics files belong to one run of the stack: start from an empty directory unless part of
  # the stack is still running (its processes keep writing to their files).
  local running=0
  while IFS=$'\t' read -r name _; do alive "$name" && running=1; done < <(procs)
  if [ $running = 0 ]; then rm -rf "${PROMETHEUS_MULTIPROC_DIR:-$RUN/prometheus}"; fi
  while IFS=$'\t' read -r name cmd; do
    if alive "$name"; then continue; fi
    echo "starting $name"
    # setsid: each process leads its own group, so `down` can stop it with all its children.
    setsid bash -c "$cmd" >>"$RUN/log/$name.log" 2>&1 < /dev/null &
    echo $! >"$RUN/pids/$name.pid"
  done < <(procs)
  for _ in $(seq 1 300); do
    if curl -fsS "http://$PORT/readyz" >/dev/null 2>&1; then echo "ready: http://$PORT"; return 0; fi
    sleep 0.2
  done
  echo "the stack did not become ready; see $RUN/log/" >&2
  return 1
}

down() {
  while IFS=$'\t' read -r name _; do
    if alive "$name"; then
      kill -TERM -- "-$(cat "$RUN/pids/$name.pid")" 2>/dev/null || kill -TERM "$(cat "$RUN/pids/$name.pid")" 2>/dev/null || true
    fi
  done < <(procs)
  for _ in $(seq 1 100); do
    local any=0
    while IFS=$'\t' read -r name _; do alive "$name" && any=1; done < <(procs)
    [ $any = 0 ] && break
    sleep 0.1
  done
  while IFS=$'\t' read -r name _; do
    if alive "$name"; then kill -KILL -- "-$(cat "$RUN/pids/$name.pid")" 2>/dev/null || true; fi
    rm -f "$RUN/pids/$name.pid"
  done < <(procs)
}

status() {
  while IFS=$'\t' read -r name _; do
    if alive "$name"; then echo "$name: up (pid $(cat "$RUN/pids/$name.pid"))"; else echo "$name: down"; fi
  done < <(procs)
}

case "${1:-status}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 {up|down|status}" >&2; exit 2 ;;
esac
