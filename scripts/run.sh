#!/usr/bin/env bash
# `make run`: web server + qcluster workers in the foreground (and the simulator when there is no
# OPENAI_API_KEY). Ctrl-C or SIGTERM stops everything this script started.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PORT="${PORT:-8000}"
# Loopback unless asked: with DEBUG on, the network must not reach tracebacks and settings.
HOST="${HOST:-127.0.0.1}"
BIND="${BIND:-$HOST:$PORT}"
groups=()

# Each service runs in a process group of its own (setsid), so stopping it reaches every process it
# forked: the cluster's sentinel, monitor, pusher and workers, gunicorn's workers. Killing a pid and
# its children left the cluster's grandchildren polling the database for ever.
start() {
  setsid "$@" </dev/null &
  groups+=($!)
}

alive() {
  for g in "${groups[@]}"; do kill -0 -- "-$g" 2>/dev/null && return 0; done
  return 1
}

stop() {
  trap - EXIT TERM HUP
  trap 'force=1' INT  # a second Ctrl-C: stop at once
  [ ${#groups[@]} -gt 0 ] || return 0
  echo "Stopping... (Ctrl-C again to stop at once)"
  # The cluster stops first, the way a service manager stops it (jobs/engine/shutdown.py): SIGTERM to its
  # main process only, which tells the workers to hand their claimed items back at once and gives requests
  # in flight BATCHSITE_SHUTDOWN_SECONDS, while the simulator still answers them. Then the web server and
  # the simulator, as groups.
  if [ -n "${cluster:-}" ]; then
    kill -TERM "$cluster" 2>/dev/null
    for _ in $(seq 1 $(( (${BATCHSITE_SHUTDOWN_SECONDS:-10} + 1) * 4 ))); do
      kill -0 -- "-$cluster" 2>/dev/null || break
      [ -z "${force:-}" ] || break
      sleep 0.25
    done
  fi
  for g in "${groups[@]}"; do [ "$g" = "${cluster:-}" ] || kill -TERM -- "-$g" 2>/dev/null; done
  for _ in $(seq 1 8); do
    alive || break
    [ -z "${force:-}" ] || break
    sleep 0.25
  done
  # Past the bound, or asked twice: whatever is left goes now. Still safe: the leases of items not handed
  # back expire and the sweeper gives them to the next start.
  for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null; done
  wait 2>/dev/null
}
trap stop EXIT
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM HUP

if [ -z "${OPENAI_API_KEY:-}" ]; then
  SIM_PORT="${BATCHSITE_SIMULATOR_PORT:-8100}"
  start "$PY" manage.py simulate_openai --port "$SIM_PORT" --latency-ms 300
  export OPENAI_API_KEY="sk-simulator" OPENAI_BASE_URL="http://127.0.0.1:$SIM_PORT/v1"
  echo "No OPENAI_API_KEY set: jobs run against the built-in simulator at $OPENAI_BASE_URL"
fi

start "$PY" manage.py qcluster
cluster=${groups[-1]}
start "$PY" -m gunicorn --config gunicorn.conf.py --bind "$BIND"

sleep 1
url_host="${BIND%:*}"
case "$url_host" in 0.0.0.0 | "[::]" | "") url_host=127.0.0.1 ;; esac
echo
echo "  Batchsite is running at http://$url_host:${BIND##*:}/ (listening on $BIND)"
case "$(echo "${DEBUG:-1}" | tr '[:upper:]' '[:lower:]')" in
  1 | true | yes | on)
    echo "  DEBUG is on: error pages show code and settings. Fine on your laptop; set DEBUG=0 (with"
    echo "  SECRET_KEY and ALLOWED_HOSTS) before anyone else can reach it." ;;
esac
"$PY" manage.py ensure_demo_user --quiet-if-disabled
echo "  Press Ctrl-C to stop."
echo
wait -n
