# Two commands matter on a fresh machine:
#   make quickstart   run examples/quickstart.py on the embedded SQLite default (no server)
#   make test         the whole test suite, against the local PostgreSQL, Redis and moto S3
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: quickstart test lint bench clean

quickstart: $(VENV)/.core
	$(BIN)/python examples/quickstart.py

test: $(VENV)/.dev
	bash scripts/start-services
	$(BIN)/python -m pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict pydantic_toast
	$(BIN)/mypy --strict examples/typed_usage.py examples/kv_backend.py

bench: $(VENV)/.dev
	bash scripts/start-services
	$(BIN)/python -m benchmarks

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.core

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache quickstart.db*
