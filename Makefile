# gpufleet: `make run` (embedded demo) and `make test` (whole suite) set themselves up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DURATION ?= 0
PYTEST_ARGS ?=

.PHONY: run test test-fast lint bench soak schema clean setup

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/gpufleet demo $(if $(filter-out 0,$(DURATION)),--duration $(DURATION))

# The whole suite: the fast unit lane and the integration lane (real broker, chDB, Alertmanager, processes).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# The unit lane alone: no service, no process (tests/conftest.py marks the rest `integration`); seconds.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench.run

soak: $(STAMP)
	$(BIN)/python -m bench.soak

schema: $(STAMP)
	$(BIN)/gpufleet schema --out docs/wire-format.schema.json

clean:
	rm -rf $(VENV) var .pytest_cache
