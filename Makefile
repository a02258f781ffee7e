# The README's commands. Each one does all of its own set-up and is safe to run again.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
# A new stamp whenever the lock or pyproject.toml changes: the venv is then synced to the lock again.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)
UV := $(VENV)/bin/uv
# Everything resolved in the lock (pinned, with hashes), nothing from the index's latest; setup never upgrades.
UV_LOCK_ARGS := --python-version 3.11 --generate-hashes --quiet

.PHONY: setup run test test-fast check bench screenshots clean lock upgrade

setup: $(STAMP)
	$(PY) manage.py prepare

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements/uv.txt
	# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (CI) Python
	# never does, so every process the tests start would compile Django and the SDK again (~0.7 s each).
	$(UV) pip sync --quiet --python $(PY) --require-hashes --compile-bytecode $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# After a change to pyproject.toml's dependencies: resolve what is new, keep every other pin, install.
lock:
	test -x $(UV) || $(MAKE) $(STAMP)
	$(UV) pip compile pyproject.toml requirements/tools.in --extra test $(UV_LOCK_ARGS) -o $(LOCK)
	$(MAKE) setup

# On purpose only: resolve every dependency again to the newest allowed by pyproject.toml, then install it.
# Commit the new lock once `make test` passes on it.
upgrade:
	test -x $(UV) || $(MAKE) $(STAMP)
	$(UV) pip compile pyproject.toml requirements/tools.in --extra test $(UV_LOCK_ARGS) --upgrade -o $(LOCK)
	$(UV) pip compile requirements/tools.in $(UV_LOCK_ARGS) --no-emit-package setuptools -o requirements/uv.txt
	$(MAKE) setup

# exec: make's SIGTERM then reaches run.sh itself, not a /bin/sh that would die and leave it running.
run: setup
	PYTHON=$(PY) exec bash scripts/run.sh

test: setup
	scripts/test.sh

# The inner loop: every test but the slow end-to-end ones (servers, clusters, Chromium), on SQLite only.
test-fast: setup
	BATCHSITE_DATA_DIR="$(CURDIR)/var/test-fast" $(PY) -m pytest -m "not slow" $(ARGS)

# Lint, format, layer contracts and types only (make test runs them first).
check: setup
	scripts/check.sh

bench: setup
	$(PY) bench/ingest_export.py
	$(PY) bench/simulator.py

screenshots: setup
	$(PY) scripts/screenshots.py

clean:
	rm -rf $(VENV) var staticfiles
