# Two entry points for a newcomer: `make run` (install, then the main job) and `make test`.
# TORCH picks the torch build: the default lets pip choose (a CUDA build on a GPU box); CI exports
# TORCH=torch==2.13.0 to take the CPU build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
BIN := $(VENV)/bin

.PHONY: install run test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"

run: install
	$(BIN)/ampray train

# pyflakes' checks first: a name used before it is bound in a branch no CPU test reaches (a CUDA-only
# line) fails here, not on a GPU host.
test: install
	$(BIN)/ruff check --select F --no-cache ampray benchmarks tests
	$(BIN)/python -m pytest -q
