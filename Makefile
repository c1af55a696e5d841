# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates the local venv first (torch 2.13.0 CPU wheel first, so nothing pulls a CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export DS_BUILD_OPS ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-slow lint clean-runs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sora-pipeline experiment=demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q tests

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check sora_lightning tools tests
	$(VENV)/bin/ruff format --check sora_lightning tools tests

clean-runs:
	rm -rf runs
