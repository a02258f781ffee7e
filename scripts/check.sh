#!/usr/bin/env bash
# Static checks, before the tests (make test runs this first; make check alone): lint and format
# (ruff), the layer contracts (import-linter: the core imports nothing above it; engine, api and web
# meet only through the core; the simulator stays free of Django), task names only in jobs/queue.py, no module
# under jobs/ over 500 lines, and types (mypy + django-stubs).
# Any failure fails `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export BATCHSITE_DATA_DIR="${BATCHSITE_DATA_DIR:-$PWD/var/check}"  # mypy's Django plugin loads the settings
status=0
run() {
  echo "== $*"
  "$@" || status=1
}
run "$BIN/ruff" check .
run "$BIN/ruff" format --check .
run "$BIN/lint-imports" --no-cache
run "$BIN/python" scripts/check_names.py
run "$BIN/python" scripts/check_sizes.py
run "$BIN/mypy"
if [ "$status" != 0 ]; then
  echo "Static checks failed (above). ruff fixes most lint and format issues: $BIN/ruff check --fix . && $BIN/ruff format ." >&2
fi
exit "$status"
