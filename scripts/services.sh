#!/usr/bin/env bash
# Throwaway Postgres 15 and Redis 7 on loopback for the test suite: `start` prints the
# DATABASE_URL and REDIS_URL exports, `stop` removes everything. Installs them with apt if needed.
set -euo pipefail
DIR="${BATCHSITE_SERVICES_DIR:-/tmp/batchsite-services}"
PG_PORT="${BATCHSITE_PG_PORT:-5440}"
REDIS_PORT="${BATCHSITE_REDIS_PORT:-6390}"
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)

install() {
  if [ -z "$PG_BIN" ] || ! command -v redis-server >/dev/null; then
    echo "Installing postgresql and redis-server with apt..." >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq postgresql redis-server; } >/tmp/batchsite-apt.log 2>&1 \
      || { cat /tmp/batchsite-apt.log >&2; exit 1; }
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  fi
}

start() {
  install
  stop >/dev/null 2>&1 || true
  mkdir -p "$DIR/pg" "$DIR/sock"
  chown -R postgres:postgres "$DIR"
  su postgres -s /bin/sh -c "$PG_BIN/initdb -D $DIR/pg -A trust -U postgres >/dev/null"
  su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D $DIR/pg -l $DIR/pg.log -o '-p $PG_PORT -k $DIR/sock -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200' -w start >/dev/null"
  su postgres -s /bin/sh -c "$PG_BIN/createdb -h 127.0.0.1 -p $PG_PORT -U postgres batchsite"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
  echo "export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/batchsite"
  echo "export REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
}

stop() {
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  if [ -n "$PG_BIN" ] && [ -d "$DIR/pg" ]; then
    su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D $DIR/pg -m immediate stop" >/dev/null 2>&1 || true
  fi
  rm -rf "$DIR"
}

"${1:?usage: services.sh start|stop}"
