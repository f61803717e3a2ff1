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

.PHONY: setup demo test test-fast lint browser
setup: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/ether-diffusion demo

# Chromium for the studio's browser test (Debian's package; a clear message where it cannot be installed)
browser:
	@bash scripts/install_chromium.sh

# everything, as CI runs it: lint, the fast tier and the slow end-to-end tier (demos, browser, several processes)
test: $(BIN)/.installed browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# everyday work: the tests not marked slow (882 tests, 90 s on the 2-core reference machine; the full suite 9-13 minutes)
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
