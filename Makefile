# Two commands matter: `make run` and `make test`. Each bootstraps .venv from pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit test-deps bench fuzz check clean docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/nearestd --config config/example.toml

check: $(STAMP)
	$(BIN)/nearestd --config config/example.toml --check

test: $(STAMP) test-deps lint typecheck unit

test-deps:
	@sh scripts/install-test-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check daemon clients tests bench
	$(BIN)/ruff format --check daemon clients

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

# `make bench floods` runs one section (bench/floods.py); `make bench` runs them all.
BENCH_SECTIONS := $(if $(filter bench,$(firstword $(MAKECMDGOALS))),$(wordlist 2,99,$(MAKECMDGOALS)))
bench: $(STAMP) test-deps
	$(BIN)/python -m bench $(BENCH_SECTIONS)
ifneq ($(BENCH_SECTIONS),)
$(BENCH_SECTIONS):
	@:
endif

fuzz: $(STAMP)
	$(BIN)/python -m bench.fuzz

clean:
	rm -rf $(VENV) .run .state .mypy_cache .ruff_cache .pytest_cache .hypothesis

docs: $(STAMP)
	$(BIN)/python scripts/config_docs.py
	$(BIN)/python scripts/metrics_docs.py
