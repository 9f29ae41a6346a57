# Two entry points for a newcomer: `make run` (install, then the main job) and `make test`.
# TORCH picks the torch build. Left unset: on a machine with an NVIDIA GPU (nvidia-smi found) PyPI's
# torch (a CUDA build); without one, the CPU build from PyTorch's own index when that index answers within
# 5 s (PyPI's Linux torch is the CUDA build, several GB, whose GPU parts a CPU-only machine never uses;
# where the index cannot be reached pip would retry it for minutes, so PyPI's is taken then). Set, it is
# installed as given (CI exports TORCH=torch==2.13.0, a CPU wheel its machines hold), as is TORCH_INDEX
# (pip's index flags).
PYTHON ?= python3
VENV ?= .venv
CPU_INDEX := https://download.pytorch.org/whl/cpu
ifeq ($(origin TORCH),undefined)
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
ifeq ($(shell $(PYTHON) -c "import urllib.request as u; u.urlopen('$(CPU_INDEX)/torch/', timeout=5)" >/dev/null 2>&1 && echo up),up)
TORCH_INDEX ?= --index-url $(CPU_INDEX) --extra-index-url https://pypi.org/simple
endif
endif
endif
TORCH ?= torch
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: install run test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"

run: install
	$(BIN)/ampray train

# pyflakes' checks first: a name used before it is bound in a branch no CPU test reaches (a CUDA-only
# line) fails here, not on a GPU host.
test: install
	$(BIN)/ruff check --select F --no-cache ampray benchmarks tests
	$(BIN)/python -m pytest -q
