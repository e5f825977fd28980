# The two commands a new user needs: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# `mlflow run --env-manager local` runs `python -m kdlib ...` from PATH: make it this venv's python.
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	mlflow run . -e main --env-manager local --experiment-name smoke -P experiment=experiments/smoke.yaml

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
