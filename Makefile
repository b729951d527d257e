# Commands people type. `make test` and `make serve` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build for dev and CI; the container image installs the CUDA 12.8 build instead.
TORCH_SPEC ?= torch==2.13.0
# Reference implementation: the parity oracle in tests, never a runtime dependency.
REFERENCE_SPEC ?= depth-anything-3==0.1.1
PYTEST_ARGS ?=

.PHONY: help install browser js smoke test test-fast lint format serve worker bench lock clean

# The first target: `make` alone lists the commands (each target's `## ` comment).
help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 20

$(BIN)/.installed: pyproject.toml requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet -r requirements-test.txt
	@# Last, and without its dependencies (pip then checks nobody's requirements against it,
	@# so a correct install prints no resolver error).
	$(BIN)/pip install --quiet --no-deps "$(REFERENCE_SPEC)"
	touch $@

install: $(BIN)/.installed  ## the venv in .venv: torch, this package (editable), test tools

LINT_PATHS := src tests bench scripts

lint: install  ## ruff check and format check
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/deptry src

format: install  ## ruff format and fix
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

test: install browser js lint smoke  ## lint, the runtime smoke and the whole test suite
	$(BIN)/pytest $(PYTEST_ARGS)

# The runtime smoke (scripts/smoke.py: both transports, every output, a random checkpoint) in
# its own venv built from the image's lock as the Dockerfile does, CPU torch for the CUDA build
# (scripts/smoke_env.py), no test extras. The venv is rebuilt when the lock changes.
SMOKE_VENV ?= .smoke-venv
$(SMOKE_VENV)/.installed: requirements/pylock.docker.toml scripts/smoke_env.py | $(BIN)/.installed
	$(BIN)/python scripts/smoke_env.py $(SMOKE_VENV) --python "$(PYTHON)" --torch "$(TORCH_SPEC)" --uv $(BIN)/uv
	touch $@

smoke: $(SMOKE_VENV)/.installed  ## the runtime smoke in a venv from the image's lock (CPU torch)
	$(BIN)/uv pip install --quiet --python $(SMOKE_VENV)/bin/python --no-deps --reinstall-package da3-serverless .
	$(SMOKE_VENV)/bin/python scripts/smoke.py

# The playground test drives Debian's chromium (never Playwright's own download) and the
# README's examples use curl. CI runs as root and installs them; elsewhere, install them
# yourself or those tests skip (under CI=true they fail).
browser:  ## chromium and curl for the browser and README tests (as root)
	@command -v chromium >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium curl >/dev/null; } || \
	  echo "warning: chromium/curl missing and not root: the browser and curl tests will skip"

# Node tools the tests run on the scene files (Khronos' glTF validator), from tests/js's lock file.
JS_TESTS := tests/js
$(JS_TESTS)/node_modules/.installed: $(JS_TESTS)/package.json $(JS_TESTS)/package-lock.json
	npm ci --prefix $(JS_TESTS) --no-audit --no-fund --loglevel=error
	touch $@

js: $(JS_TESTS)/node_modules/.installed  ## the Node test tools (glTF validator) into tests/js

# The quick local loop (README: its time on two cores): leaves out the slow tests (giant
# presets, browser, load test, anything over ~10 s), those that start the service in another
# process (`server`) and those that build the large presets (`large`); runs in two processes
# (pytest-xdist) with a tenth of the property tests' examples (conftest's `fast` Hypothesis
# profile). Every module is still run (test_code_shape checks that each is imported).
test-fast: install  ## the quick loop: no servers, no large checkpoints
	$(BIN)/pytest -n 2 --hypothesis-profile=fast -m "not slow and not server and not large" $(PYTEST_ARGS)

# The self-hosted server (playground at /, API docs at /docs, also RunPod's {"input": ...} form
# and /v2 paths) on 127.0.0.1:$(PORT) with MODEL_ID (default: the nested metric model,
# downloaded into ./workspace/cache on first start). Without DA3_API_KEY it serves loopback
# unauthenticated, for trying it out. `make worker`: RunPod's local test API instead.
PORT ?= 8000
LOCAL_AUTH = DA3_ALLOW_UNAUTHENTICATED=$${DA3_ALLOW_UNAUTHENTICATED:-$$([ -n "$$DA3_API_KEY" ] && echo 0 || echo 1)}
serve worker: export WORKSPACE ?= $(CURDIR)/workspace
serve: install  ## the server with its playground on http://127.0.0.1:8000 (PORT, MODEL_ID)
	$(LOCAL_AUTH) $(BIN)/da3-serverless serve --host 127.0.0.1 --port $(PORT)

worker: install  ## RunPod's local test API around the worker on 127.0.0.1:8000
	$(LOCAL_AUTH) $(BIN)/python -m da3_serverless.runpod_worker --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port $(PORT)

bench: install  ## the CPU forward benchmark
	$(BIN)/python bench/cpu_forward.py

# Re-lock the container's dependencies (requirements/pylock.docker.toml) after changing them.
lock: install  ## re-lock the container's dependencies
	$(BIN)/pip install --quiet uv
	UV=$(BIN)/uv scripts/lock.sh

clean:  ## remove the venv and caches
	rm -rf $(VENV) $(SMOKE_VENV) .pytest_cache .ruff_cache .hypothesis
