# bff: the commands a newcomer needs. `make run` for a demo, `make test` for every test.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OP_DIR  := tests/op

.PHONY: run test unit integration e2e lint fmt bench install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(OP_DIR)/node_modules: $(OP_DIR)/package-lock.json
	cd $(OP_DIR) && npm ci --no-audit --no-fund --silent
	touch $@

## The demo: bff + a mock OpenID Provider + an echo API, memory store (REDIS_URL=... for Redis).
run: $(STAMP)
	$(BIN)/python -m demo

## Every test: unit, integration (real redis-server + oidc-provider), browser (Chromium).
test: $(STAMP) $(OP_DIR)/node_modules
	$(BIN)/pytest -q -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP) $(OP_DIR)/node_modules
	$(BIN)/pytest -q tests/integration

e2e: $(STAMP) $(OP_DIR)/node_modules
	$(BIN)/pytest -q tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check bff tests demo bench
	$(BIN)/ruff format --check bff
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format bff tests demo bench
	$(BIN)/ruff check --fix bff tests demo bench

## Benchmarks: measure and print, assert nothing (needs wrk, nginx, redis-server, node).
bench: $(STAMP) $(OP_DIR)/node_modules
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(OP_DIR)/node_modules .pytest_cache .mypy_cache .ruff_cache
