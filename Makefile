# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
# torch is pinned to the CPU build (2.13.0); on a GPU machine, install your CUDA torch in .venv first
# and override: make test TORCH="torch"
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,train,app]"
	touch $@

.PHONY: setup demo test lint
setup: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/ether-diffusion demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
