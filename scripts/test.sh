#!/usr/bin/env bash
# Runs the whole suite in the project's venv. Exit code 5 (no tests collected) is a failure here.
set -euo pipefail
cd "$(dirname "$0")/.."
export BATCHSITE_DATA_DIR="${BATCHSITE_DATA_DIR:-$PWD/var/test}"
mkdir -p "$BATCHSITE_DATA_DIR"
exec .venv/bin/python -m pytest "$@"
