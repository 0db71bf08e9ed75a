#!/usr/bin/env bash
# Runs the Procfile's processes in the background with pid files: `up` (idempotent), `down`, `status`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dev stack runs the local settings unless told otherwise (the entry points default to production).
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-config.settings.local}"
RUN=.run
mkdir -p "$RUN/log" "$RUN/pids"
PORT=${WEB_BIND:-127.0.0.1:8000}

alive() {
  local pid
  pid=$(cat "$RUN/pids/$1.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # A zombie is dead: killed, and its parent does not reap it (PID 1 of a container without an
  # init, once the shell that started it has exited).
  [ "$(sed -E 's/.*\) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]
}

# What is left of a process whose leader died. A `kill -9` of gunicorn's master leaves its workers
# serving and holding the port, so a new master cannot bind it and exits; a Celery parent's
# leaves its pool. The members of the dead leader's process group that run in this checkout (a
# pid file can outlive its number, reused by someone else) get TERM, and KILL after 5 s.
ROOT=$(pwd -P)
leftovers() {
  local pid
  for pid in $(pgrep -g "$1" 2>/dev/null); do
    [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$ROOT" ] && echo "$pid"
  done
  return 0
}
reap() {
  local pgid pids
  pgid=$(cat "$RUN/pids/$1.pid" 2>/dev/null) || return 0
  pids=$(leftovers "$pgid")
  [ -n "$pids" ] || return 0
  echo "stopping what is left of $1 (its leader $pgid died): $(echo $pids)"
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 50); do
    [ -n "$(leftovers "$pgid")" ] || return 0
    sleep 0.1
  done
  kill -KILL $(leftovers "$pgid") 2>/dev/null || true
}

procs() { grep -E '^[a-z-]+:' Procfile | sed -E 's/^([a-z-]+):[[:space:]]*(.*)$/\1\t\2/'; }

# The providers' stand-ins take the pipeline's first charge, so `up` is done only once they listen
# too (a charge refused by a stand-in still starting would fail its order: SPEC 5).
STAND_INS="sandbox=${SANDBOX_BIND:-127.0.0.1:8001} localstripe=${LOCALSTRIPE_BIND:-127.0.0.1:8420}"
stand_ins_listening() {
  local pair name address host port
  for pair in $STAND_INS; do
    name=${pair%%=*} address=${pair#*=}
    grep -q "^$name:" Procfile || continue
    host=${address%:*} port=${address##*:}
    host=${host#[} host=${host%]}
    [[ $port =~ ^[0-9]+$ ]] || continue # a unix socket: not ours to probe
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null || return 1
  done
}

up() {
  # Metrics files belong to one run of the stack: start from an empty directory unless part of
  # the stack is still running (its processes keep writing to their files).
  local running=0
  while IFS=$'\t' read -r name _; do alive "$name" && running=1; done < <(procs)
  if [ $running = 0 ]; then rm -rf "${PROMETHEUS_MULTIPROC_DIR:-$RUN/prometheus}"; fi
  while IFS=$'\t' read -r name cmd; do
    if alive "$name"; then continue; fi
    reap "$name"
    echo "starting $name"
    # setsid: each process leads its own group, so `down` can stop it with all its children.
    setsid bash -c "$cmd" >>"$RUN/log/$name.log" 2>&1 < /dev/null &
    echo $! >"$RUN/pids/$name.pid"
  done < <(procs)
  for _ in $(seq 1 300); do
    if curl -fsS "http://$PORT/readyz" >/dev/null 2>&1 && stand_ins_listening; then
      echo "ready: http://$PORT"
      return 0
    fi
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
    reap "$name"
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
