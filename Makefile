# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates the local venv first: the torch 2.13.0 CPU wheel with pip (pip's find-links has it,
# so nothing pulls a CUDA build), then every other package at the pinned versions of
# requirements.lock with uv (torch's own dependencies included), then this project itself
# (editable, no dependencies). pip takes --no-deps --no-compile: the lock brings torch's
# dependencies. uv then byte-compiles every package once, torch included: where
# PYTHONDONTWRITEBYTECODE is set (as on CI), nothing else would, and every process of the demo
# and the tests would compile torch, Lightning and transformers again (9 s each, 2x test time).
# `make lock` re-resolves requirements.lock after a dependency changes in pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed-stamp
LOCK := requirements.lock
TORCH ?= torch==2.13.0
UV_VERSION ?= 0.13.9
# uv does not read pip's configuration: the lock is resolved against pip's find-links (the local
# torch wheel). Recursive `=`, so pip is asked only when `make lock` runs.
FIND_LINKS = $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
export DS_BUILD_OPS ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup lock demo test test-slow lint clean-runs

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps --no-compile $(TORCH) uv==$(UV_VERSION)
	$(UV) pip install -q --compile-bytecode --python $(PY) -r $(LOCK)
	$(UV) pip install -q --python $(PY) --no-deps -e .
	@# torch came from pip (uv compiles only what it installed); one test-only file is 3.12 syntax
	$(PY) -m compileall -qq -j 0 -x py312_intrinsics $(VENV)/lib/python*/site-packages/torch sora_lightning
	@# a dependency added to pyproject.toml but not to the lock fails here: run `make lock`
	$(UV) pip check -q --python $(PY)
	touch $(STAMP)

setup: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)

# Keeps the pins already in the lock where they still fit; `make lock LOCK_ARGS=--upgrade` moves
# every package to its newest allowed release.
lock: $(UV)
	constraints=$$(mktemp) && echo '$(TORCH)' > $$constraints && \
	$(UV) pip compile -q pyproject.toml --extra dev --python $(PY) -c $$constraints \
		$(foreach d,$(FIND_LINKS),--find-links $(d)) --no-emit-package torch \
		--custom-compile-command 'make lock' $(LOCK_ARGS) -o $(LOCK); \
	rc=$$?; rm -f $$constraints; exit $$rc

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
