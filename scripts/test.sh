#!/usr/bin/env bash
# The whole suite, twice: on the default set-up (SQLite, database broker, file-based rate limits),
# then on the scaled-out one (Postgres, Redis broker and rate limits), each on throwaway servers.
# BATCHSITE_TEST_SERVERS=0 skips the second run (e.g. on a machine without apt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

# Browser tests drive Debian's Chromium (Playwright cannot download its own here).
if [ ! -x /usr/bin/chromium ]; then
  echo "Installing chromium with apt..."
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/tmp/batchsite-apt-chromium.log 2>&1 \
    || { cat /tmp/batchsite-apt-chromium.log; exit 1; }
fi

scripts/check.sh

echo "== SQLite + database broker"
BATCHSITE_DATA_DIR="$PWD/var/test" "$PY" -m pytest "$@"

if [ "${BATCHSITE_TEST_SERVERS:-1}" = "1" ]; then
  echo "== Postgres + Redis"
  trap 'scripts/services.sh stop' EXIT
  eval "$(scripts/services.sh start)"
  export DATABASE_URL REDIS_URL
  BATCHSITE_DATA_DIR="$PWD/var/test-pg" "$PY" -m pytest "$@"
fi
