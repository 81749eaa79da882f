# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Idle OpenMP threads sleep instead of spinning: on a small shared CPU spinning costs 10x (see docs/benchmarks.md).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test test-fast typecheck lint demo bench clean

setup: $(STAMP)

# torch first (the local CPU build); then the package with its dev extras. Re-run when pyproject changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

# mypy over src/mtaffect, configured in pyproject.toml's [tool.mypy].
typecheck: setup
	$(BIN)/mypy

# Test files spread over the cores (at most 4 processes: each holds torch), a file's tests in one process
# so module fixtures are built once; `pytest tests/test_x.py` alone runs serially as usual.
test: setup lint typecheck
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

# The quick subset for editing: every test but those marked `slow` (trainings, pipelines, CV, DDP, exports
# of trained models, anything over ~2 s). `make test` and CI still run them all.
test-fast: setup lint
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile -m "not slow"

demo: setup
	bash scripts/demo.sh

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache .mypy_cache demo_out
