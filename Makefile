# Commands people type. `make test` and `make serve` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build for dev and CI; the container image installs the CUDA 12.8 build instead.
TORCH_SPEC ?= torch==2.13.0
# Reference implementation: the parity oracle in tests, never a runtime dependency.
REFERENCE_SPEC ?= depth-anything-3==0.1.1
PYTEST_ARGS ?=

.PHONY: install browser test test-fast lint format serve bench lock clean

$(BIN)/.installed: pyproject.toml requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps "$(REFERENCE_SPEC)"
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

install: $(BIN)/.installed

LINT_PATHS := src tests bench scripts

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/deptry src

format: install
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

test: install browser lint
	$(BIN)/pytest $(PYTEST_ARGS)

# The playground test drives Debian's chromium (never Playwright's own download) and the
# README's examples use curl. CI runs as root and installs them; elsewhere, install them
# yourself or those tests skip (under CI=true they fail).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium curl >/dev/null; } || \
	  echo "warning: chromium/curl missing and not root: the browser and curl tests will skip"

# Skips the slow tests (giant presets, browser, load test) for a quick local loop.
test-fast: install
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# RunPod's local test API on 127.0.0.1:$(PORT) with MODEL_ID (default: the nested metric
# model, downloaded into ./workspace/cache on first start). Without DA3_API_KEY it serves
# loopback unauthenticated, for trying it out.
PORT ?= 8000
serve: export WORKSPACE ?= $(CURDIR)/workspace
serve: install
	DA3_ALLOW_UNAUTHENTICATED=$${DA3_ALLOW_UNAUTHENTICATED:-$$([ -n "$$DA3_API_KEY" ] && echo 0 || echo 1)} \
	$(BIN)/python -m da3_serverless.runpod_worker --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port $(PORT)

bench: install
	$(BIN)/python bench/cpu_forward.py

# Re-lock the container's dependencies (requirements/pylock.docker.toml) after changing them.
lock: install
	$(BIN)/pip install --quiet uv
	UV=$(BIN)/uv scripts/lock.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
