# Two commands for a fresh machine:
#   make demo   - create .venv, install sortednet, train nested sub-models on digits, print the budget table
#   make test   - create .venv, install sortednet with test extras, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python examples/train_digits.py

test: install
	$(BIN)/python -m pytest -n 2 --doctest-glob='*.md' src tests docs

lint: install
	$(BIN)/ruff check src tests examples benchmarks

.PHONY: install demo test lint
