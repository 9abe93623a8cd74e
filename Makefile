# MatrixInfer developer workflow. Every target sets up what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: all setup system-deps test lint format demo crds crds-check bench clean

all: test

# Python environments: created once, re-installed when pyproject.toml changes. The demo needs the
# runtime dependencies only; tests, lint and benchmarks add the dev extras.
$(RUNTIME_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing MatrixInfer and its runtime dependencies into $(VENV) (once)"
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --progress-bar off -e . | grep -E '^(Collecting|Successfully)' || true
	@$(PY) -c "import extproc, controllers, sim, matrixinfer" 2>/dev/null || \
	  { echo "error: the runtime install failed; run: $(PY) -m pip install -e ."; exit 1; }
	@touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP) pyproject.toml
	@echo "installing the development extras (tests, lint, benchmarks) into $(VENV) (once)"
	@$(PY) -m pip install --progress-bar off -e '.[dev]' | grep -E '^(Collecting|Successfully)' || true
	@$(PY) -c "import pytest, mypy, kmock" 2>/dev/null || \
	  { echo "error: the dev install failed; run: $(PY) -m pip install -e '.[dev]'"; exit 1; }
	@touch $(STAMP)

# Debian packages the tests use (installed only when missing, and only as root).
system-deps:
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server (Debian package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "warning: redis-server is missing and cannot be installed here (need root + apt-get)"; \
	  fi; \
	fi

setup: $(STAMP) system-deps

test: setup
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy crds fleet extproc controllers sim runtime matrixinfer
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

crds: $(STAMP)
	$(PY) -m crds

crds-check: $(STAMP)
	$(PY) -m crds --check

demo: $(RUNTIME_STAMP)
	$(VENV)/bin/matrixinfer demo

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
