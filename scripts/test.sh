#!/usr/bin/env bash
# The whole suite (make test), in two passes side by side, each with its own data dir, database and ports:
#   1. SQLite + database broker + file-based rate limits: every test;
#   2. Postgres + Redis (throwaway servers): the tests that use the database (browser tests aside), since
#      only those can behave differently on the scaled-out stack (tests/conftest.py marks them).
# Each pass prints its 30 slowest tests and its wall time; the last line adds both passes up.
# Arguments go to both passes' pytest (scripts/test.sh tests/test_export.py -k csv).
# BATCHSITE_TEST_SERVERS=0 skips the second pass (e.g. on a machine without apt).
# BATCHSITE_TEST_SIDE_BY_SIDE=0 runs the passes one after the other (output as it comes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LOGS=var/test-logs
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log

# Browser tests drive Debian's Chromium (Playwright cannot download its own here).
if [ ! -x /usr/bin/chromium ]; then
  echo "Installing chromium with apt..."
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/tmp/batchsite-apt-chromium.log 2>&1 \
    || { cat /tmp/batchsite-apt-chromium.log; exit 1; }
fi

scripts/check.sh
# Our own modules compiled once, for the hundreds of processes the suite starts (where PYTHONDONTWRITEBYTECODE
# is set, as in CI, each would compile them again).
"$PY" -m compileall -q -j 0 jobs batchsite simulator tests manage.py >/dev/null

SERVERS="${BATCHSITE_TEST_SERVERS:-1}"
if [ "$SERVERS" = "1" ]; then
  trap 'scripts/services.sh stop' EXIT
  eval "$(scripts/services.sh start)"
fi

# pass NAME ARGS...: one pytest run, its output in $LOGS/NAME.log, its exit status and wall time after it.
pass() {
  local name=$1
  shift
  local start=$SECONDS status=0
  "$@" >"$LOGS/$name.log" 2>&1 || status=$?
  echo "$name: $((SECONDS - start)) s, exit $status" >>"$LOGS/$name.log"
  return "$status"
}
sqlite_pass() {
  env -u DATABASE_URL -u REDIS_URL BATCHSITE_DATA_DIR="$PWD/var/test" \
    "$PY" -m pytest --durations=30 "$@"
}
stack_pass() {
  DATABASE_URL="$DATABASE_URL" REDIS_URL="$REDIS_URL" BATCHSITE_DATA_DIR="$PWD/var/test-pg" \
    "$PY" -m pytest --durations=30 -m "database and not browser" "$@" || {
    local status=$?
    [ "$status" = 5 ] && echo "(no database test among those asked for)" && return 0  # pytest's 'nothing collected'
    return "$status"
  }
}

status=0
if [ "$SERVERS" = "1" ] && [ "${BATCHSITE_TEST_SIDE_BY_SIDE:-1}" = "1" ]; then
  echo "== Two passes side by side: SQLite + database broker (every test), Postgres + Redis (database tests)"
  echo "   (logs in $LOGS/sqlite.log and $LOGS/postgres-redis.log, printed when each pass ends)"
  pass sqlite sqlite_pass "$@" &
  first=$!
  pass postgres-redis stack_pass "$@" &
  second=$!
  wait "$first" || status=1
  echo "== SQLite + database broker"
  cat "$LOGS/sqlite.log"
  wait "$second" || status=1
  echo "== Postgres + Redis"
  cat "$LOGS/postgres-redis.log"
else
  echo "== SQLite + database broker"
  sqlite_pass "$@" 2>&1 | tee "$LOGS/sqlite.log" || status=1
  if [ "$SERVERS" = "1" ]; then
    echo "== Postgres + Redis"
    stack_pass "$@" 2>&1 | tee "$LOGS/postgres-redis.log" || status=1
  fi
fi

# One closing line for both passes, from pytest's own summary lines.
"$PY" scripts/test_totals.py "$LOGS"/sqlite.log "$LOGS"/postgres-redis.log
exit "$status"
