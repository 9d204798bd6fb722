# Dev setup: a local virtual environment with everything the tests, the examples and the benchmarks need.
# On a CPU-only machine the torch pin keeps pip from pulling the multi-GB CUDA build; on a GPU machine
# run `make TORCH_CONSTRAINT= install` (or install gradproj into an environment that has CUDA torch).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CONSTRAINT ?= constraints-cpu.txt
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install train lint test bench quality clean

$(STAMP): pyproject.toml $(TORCH_CONSTRAINT)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT)) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	rm -rf runs/quickstart
	$(BIN)/gradproj train --out runs/quickstart

# lint, format check and type check of the package (each stops `make test` before pytest if it fails)
lint: $(STAMP)
	$(BIN)/ruff check gradproj
	$(BIN)/ruff format --check gradproj
	$(BIN)/mypy

test: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py

quality: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/quality.py --plot docs/img/quality_loss.png

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
