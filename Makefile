# Set-up and everyday commands. Each target creates .venv and installs the project first if needed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch; on a CUDA machine run e.g. `make TORCH=torch test`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.astr-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint format lab clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit("astr-pipeline needs Python 3.11 or newer; run make PYTHON=/path/to/python3.11" if sys.version_info < (3, 11) else 0)'
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,s3]"
	@touch $@

install: $(STAMP)  ## create .venv and install the project with its dev tools

demo: $(STAMP)  ## run the demo on embedded defaults (everything under ./.astr)
	$(BIN)/astr demo

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## check style of code and notebooks
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## fix style of code and notebooks
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lab: $(STAMP)  ## open the notebooks in JupyterLab
	$(BIN)/jupyter lab notebooks/

clean:  ## remove the virtual environment and caches (not the project home ./.astr)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
