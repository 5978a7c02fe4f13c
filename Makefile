# The two commands that matter: `make demo` (set up + run the loop on the embedded default) and
# `make test` (set up + run every test). Both are idempotent: setup is skipped when nothing changed.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export LOOP_TOOLS ?= $(CURDIR)/.loop/tools

.PHONY: setup demo test test-fast space clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m loop.demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

space: setup
	$(PY) -m app.space --out build/space

clean:
	rm -rf build test-artifacts .pytest_cache
