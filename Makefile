# MatrixInfer developer workflow. Every target sets up what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: all setup system-deps bench-deps test lint format demo crds crds-check chart-crds bench clean \
	image lock e2e

all: test

# Python environments: created once, re-installed when pyproject.toml changes. The demo needs the
# runtime dependencies only; tests, lint and benchmarks add the dev extras.
# xds-protos ships its own, older copy of the OpenTelemetry protos under opentelemetry/proto/; in
# a fresh environment it can overwrite opentelemetry-proto's files (the tracing exporter then fails
# to import). Reinstalling opentelemetry-proto last puts its files back.
OTEL_PROTO_FIX = $(PY) -m pip install --quiet --force-reinstall --no-deps \
	"opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" && \
	$(PY) -c "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope"

$(RUNTIME_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing MatrixInfer and its runtime dependencies into $(VENV) (once)"
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --progress-bar off -e . | grep -E '^(Collecting|Successfully)' || true
	@$(OTEL_PROTO_FIX)
	@$(PY) -c "import extproc, controllers, sim, matrixinfer" 2>/dev/null || \
	  { echo "error: the runtime install failed; run: $(PY) -m pip install -e ."; exit 1; }
	@touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP) pyproject.toml
	@echo "installing the development extras (tests, lint, benchmarks) into $(VENV) (once)"
	@$(PY) -m pip install --progress-bar off -e '.[dev]' | grep -E '^(Collecting|Successfully)' || true
	@$(OTEL_PROTO_FIX)
	@$(PY) -c "import pytest, mypy, kmock" 2>/dev/null || \
	  { echo "error: the dev install failed; run: $(PY) -m pip install -e '.[dev]'"; exit 1; }
	@touch $(STAMP)

# Debian packages the tests use (installed only when missing, and only as root):
# redis-server (policies tests), prometheus for promtool (tests/charts: alert rules).
SYSTEM_DEPS := redis-server:redis-server promtool:prometheus chromium:chromium  # chromium: tests/console (UI)
system-deps:
	@for dep in $(SYSTEM_DEPS); do \
	  cmd=$${dep%%:*}; pkg=$${dep#*:}; \
	  if ! command -v $$cmd >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing $$pkg (Debian package, for $$cmd)"; \
	      { [ -n "$$apt_updated" ] || apt-get update -qq; } && apt_updated=1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkg >/dev/null; \
	    else \
	      echo "warning: $$cmd is missing and cannot be installed here (need root + apt-get: $$pkg)"; \
	    fi; \
	  fi; \
	done

setup: $(STAMP) system-deps

test: setup
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy crds fleet extproc controllers sim runtime console matrixinfer
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

crds: $(STAMP)
	$(PY) -m crds
	$(MAKE) --no-print-directory chart-crds

crds-check: $(STAMP)
	$(PY) -m crds --check

# The chart ships the generated CRDs (Helm installs charts/*/crds/ before the templates);
# tests/charts/test_chart.py fails when the copies differ from crds/*.yaml.
chart-crds:
	cp crds/*.yaml charts/matrixinfer/crds/

# The container image (Dockerfile): every matrixinfer-* program plus Envoy, from requirements.lock.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE   ?= ghcr.io/matrixinfer/matrixinfer:$(VERSION)
DOCKER  ?= docker
image:
	@$(DOCKER) info >/dev/null 2>&1 || { \
	  echo "make image: no container engine answers here ('$(DOCKER) info' failed)."; \
	  echo "Build where Docker (or DOCKER=podman) runs: make image IMAGE=$(IMAGE)"; exit 1; }
	$(DOCKER) build --build-arg VERSION=$(VERSION) \
	  --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) -t $(IMAGE) .

# requirements.lock: the runtime dependencies (not the dev extras) pinned, from a fresh virtualenv.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --progress-bar off .
	{ echo "# Runtime dependencies of the image (Dockerfile), exact versions: 'make lock' regenerates this file"; \
	  echo "# from 'pip install .' in a fresh virtualenv (pip freeze, without matrixinfer itself)."; \
	  .lock-venv/bin/pip freeze --exclude matrixinfer; } > requirements.lock
	rm -rf .lock-venv build *.egg-info

# End to end on a kind cluster (image, chart, model, requests, scale, roll, kill, uninstall);
# needs Docker, kind, kubectl and helm. The same suite runs on the local stack in `make test`.
e2e: $(STAMP)
	@for tool in $(DOCKER) kind kubectl helm; do command -v $$tool >/dev/null 2>&1 || { \
	  echo "make e2e: $$tool is missing (the kind variant needs $(DOCKER), kind, kubectl, helm);"; \
	  echo "the local-stack variant runs anywhere: $(PY) -m pytest e2e"; exit 1; }; done
	$(PY) -m pytest -q -p no:cacheprovider e2e --cluster kind

demo: $(RUNTIME_STAMP)
	$(VENV)/bin/matrixinfer demo

# Load tools the benchmarks drive (Debian packages): hey and wrk (load generators), nginx (the
# fixed-answer upstream of the overhead benchmarks).
BENCH_DEPS := hey:hey wrk:wrk nginx:nginx-light
bench-deps:
	@$(MAKE) --no-print-directory system-deps SYSTEM_DEPS="$(BENCH_DEPS)"

bench: setup bench-deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
