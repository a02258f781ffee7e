#!/usr/bin/env bash
# `make run`: web server + qcluster workers in the foreground (and the simulator when there is no
# OPENAI_API_KEY). Ctrl-C stops everything this script started.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PORT="${PORT:-8000}"
pids=()
stop() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -gt 0 ] || return 0
  echo "Stopping..."
  kill -TERM "${pids[@]}" 2>/dev/null
  for _ in $(seq 1 20); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.5
  done
  # qcluster waits for running slices to end, which can take a minute. Cutting them short is
  # safe by design: their leases expire and the sweeper hands the items to the next start.
  for p in "${pids[@]}"; do
    pkill -KILL -P "$p" 2>/dev/null
    kill -KILL "$p" 2>/dev/null
  done
  wait 2>/dev/null
}
trap stop EXIT INT TERM

if [ -z "${OPENAI_API_KEY:-}" ]; then
  SIM_PORT="${BATCHSITE_SIMULATOR_PORT:-8100}"
  "$PY" manage.py simulate_openai --port "$SIM_PORT" --latency-ms 300 &
  pids+=($!)
  export OPENAI_API_KEY="sk-simulator" OPENAI_BASE_URL="http://127.0.0.1:$SIM_PORT/v1"
  echo "No OPENAI_API_KEY set: jobs run against the built-in simulator at $OPENAI_BASE_URL"
fi

"$PY" manage.py qcluster &
pids+=($!)
"$PY" -m gunicorn --config gunicorn.conf.py --bind "0.0.0.0:$PORT" &
pids+=($!)

sleep 1
echo
echo "  Batchsite is running at http://127.0.0.1:$PORT/"
"$PY" manage.py ensure_demo_user --quiet-if-disabled
echo "  Press Ctrl-C to stop."
echo
wait -n
stop
