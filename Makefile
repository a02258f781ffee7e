# The README's commands. Each one does all of its own set-up and is safe to run again.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: setup run test check bench screenshots clean

setup: $(STAMP)
	$(PY) manage.py prepare

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# exec: make's SIGTERM then reaches run.sh itself, not a /bin/sh that would die and leave it running.
run: setup
	PYTHON=$(PY) exec bash scripts/run.sh

test: setup
	scripts/test.sh

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
