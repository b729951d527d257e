# Commands people type. `make test` and `make serve` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build for dev and CI; the container image installs the CUDA 12.8 build instead.
TORCH_SPEC ?= torch==2.13.0
# Reference implementation: the parity oracle in tests, never a runtime dependency.
REFERENCE_SPEC ?= depth-anything-3==0.1.1
PYTEST_ARGS ?=

.PHONY: install test test-fast lint format serve bench clean

$(BIN)/.installed: pyproject.toml requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps "$(REFERENCE_SPEC)"
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

test: install lint
	$(BIN)/pytest $(PYTEST_ARGS)

# Skips the slow tests (giant presets, browser, load test) for a quick local loop.
test-fast: install
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

serve: install
	$(BIN)/da3-serverless predict ../shared/data/images/soh-000.png --model da3-small --random-weights -o /tmp/da3-soh-000.npz

bench: install
	$(BIN)/python bench/cpu_forward.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
