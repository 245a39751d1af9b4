# Two commands matter on a fresh machine:
#   make quickstart   run examples/quickstart.py on the embedded SQLite default (no server)
#   make test         the whole test suite, against the local PostgreSQL, Redis and moto S3
# Both create .venv and install what they need on first use. The others:
#   make lint         ruff and mypy --strict
#   make docs         the documentation site, built strictly into site/
#   make package      sdist and wheel in dist/, checked, and the quickstart run from the wheel
#                     in a fresh virtual environment outside the source tree
#   make test-embedded PY=3.12   the tests that need no server, on another Python (pyenv)
#   make bench        the benchmarks;  make clean   removes everything the others write

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY ?= 3.12
PYVENV := .venv-$(PY)

.PHONY: quickstart test test-embedded lint docs docs-serve package bench clean

quickstart: $(VENV)/.core
	$(BIN)/python examples/quickstart.py

test: $(VENV)/.dev
	bash scripts/start-services
	$(BIN)/python -m pytest

test-embedded: $(PYVENV)/.dev
	$(PYVENV)/bin/python -m pytest -p tests.embedded_only

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict pydantic_toast
	$(BIN)/mypy --strict examples/typed_usage.py examples/kv_backend.py

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The wheel is installed with pip from dist/ (its dependencies from the package index) into a
# virtual environment of its own, and run from a directory outside the checkout, without
# PYTHONPATH: what a user gets from `pip install`, not what the source tree provides.
package: $(VENV)/.dev
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*
	@set -eu; \
	outside=$$(mktemp -d); trap 'rm -rf "$$outside"' EXIT; \
	$(PYTHON) -m venv "$$outside/venv"; \
	"$$outside/venv/bin/python" -m pip install -q dist/*.whl; \
	cp examples/quickstart.py "$$outside/"; \
	cd "$$outside"; \
	env -u PYTHONPATH ./venv/bin/python quickstart.py; \
	env -u PYTHONPATH ./venv/bin/python -c 'import sys, pydantic_toast as p; assert p.__file__.startswith(sys.prefix), p.__file__; print("installed", p.__version__, "from", p.__file__)'

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

$(VENV)/.docs: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@ $(VENV)/.core

# Another Python for test-embedded: pyenv's latest $(PY), with the dev extras.
$(PYVENV)/.dev: pyproject.toml
	"$$(pyenv prefix $(PY))/bin/python" -m venv $(PYVENV)
	$(PYVENV)/bin/python -m pip install -q --upgrade pip
	$(PYVENV)/bin/python -m pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .venv-*/ .pytest_cache .mypy_cache .ruff_cache .hypothesis site dist build
	rm -f quickstart.db* examples/quickstart.db*
