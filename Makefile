# gpufleet: `make run` (embedded demo) and `make test` (whole suite) set themselves up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DURATION ?= 0
PYTEST_ARGS ?=

VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' gpufleet/version.py)
ARCH := $(shell uname -m)
AGENT_VENV := build/agent-venv
AGENT_ARTIFACT := dist/gpufleet-agent-$(VERSION)-linux-$(ARCH)
AGENT_SOURCES := $(shell find gpufleet agents -name '*.py') pyproject.toml constraints.txt deploy/agent/build_artifact.py deploy/agent/entry.py
WHEELHOUSE := dist/wheelhouse

.PHONY: run test test-fast typecheck lint bench bench-peers soak schema clean setup agent-artifact agent-wheelhouse gpu-smoke

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
	$(BIN)/mypy gpufleet
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# The unit lane alone: no service, no process (tests/conftest.py marks the rest `integration`); seconds.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy gpufleet
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

# Types: the shared core strictly ([tool.mypy] in pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy gpufleet

lint: $(STAMP)
	$(BIN)/ruff check .

# The peers the benchmarks compare against (Debian prometheus, victoria-metrics), installed when missing.
bench-peers:
	bench/install-peers.sh

bench: $(STAMP) bench-peers
	$(BIN)/python -m bench.run

soak: $(STAMP)
	$(BIN)/python -m bench.soak

# On a GPU node: a few minutes of the real NVML collector, one JSON report (docs/nvml-agent.md).
gpu-smoke: $(STAMP)
	$(BIN)/python -m bench.gpu_smoke --out var/gpu-smoke.json

schema: $(STAMP)
	$(BIN)/gpufleet schema --out docs/wire-format.schema.json

# The self-contained agent (one executable with its own Python; docs/deploy.md): a build venv with the
# agent-only install and PyInstaller, pinned by constraints.txt; never part of `make test`'s path.
agent-artifact: $(AGENT_ARTIFACT)

$(AGENT_ARTIFACT): $(AGENT_SOURCES)
	rm -rf $(AGENT_VENV)
	$(PY) -m venv $(AGENT_VENV)
	$(AGENT_VENV)/bin/pip install -q --upgrade pip
	$(AGENT_VENV)/bin/pip install -q -c constraints.txt . pyinstaller pyinstaller-hooks-contrib
	$(AGENT_VENV)/bin/python deploy/agent/build_artifact.py deploy/agent/entry.py

# The agent as wheels with a hash-pinned requirements file, for `install.sh --wheelhouse` (Python 3.11+).
agent-wheelhouse:
	rm -rf $(WHEELHOUSE)
	$(PY) -m pip wheel -q -c constraints.txt -w $(WHEELHOUSE) .
	$(PY) deploy/agent/wheelhouse_requirements.py $(WHEELHOUSE)

clean:
	rm -rf $(VENV) var .pytest_cache build dist
