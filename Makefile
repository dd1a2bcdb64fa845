# One plain runner for every job. Each target installs what it needs into .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: demo test lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamps are keyed on pyproject.toml so a changed dependency list reinstalls.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[serve,train,dev]"
	touch $@

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[serve,train]"
	touch $@

## demo: train+export a small ranker and recall model on synthetic data if models/ has none, then serve them
demo: $(VENV)/.demo
	$(BIN)/mtrank demo --host $(HOST) --port $(PORT)

## lint: ruff (lint + format check), mypy, and the import layers (import-linter, pyproject.toml)
lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## test: lint, type checks and the whole suite (Redis-backed tests included)
test: lint
	$(BIN)/python -m pytest -q

## bench: the benchmarks in bench/ (long; results go to docs/benchmarks.md by hand)
bench: $(VENV)/.dev
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find models -mindepth 1 ! -name .gitkeep -prune -exec rm -rf {} +
