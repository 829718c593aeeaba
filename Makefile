# Two commands do all the set-up on a fresh clone:
#   make bench   -- the main job: the quick benchmark on the device at hand
#   make test    -- the test suite (what CI runs; CELOSS_SKIP_PACKAGING_TEST=1 skips the wheel build test)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bench test setup
bench: setup
	@echo "== running the quick benchmark: python -m benchmarks"
	$(PY) -m benchmarks

test: setup
	$(PY) -m pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py requirements-dev.txt $(wildcard cpu/*.pyx cpu/*.pxd cpu/*.h)
	@test -x $(PY) || { echo "== creating the virtual environment $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "== installing the pinned development dependencies (requirements-dev.txt)"
	$(PY) -m pip install -q -r requirements-dev.txt
	@echo "== building the CPU kernels and installing celoss in editable mode (about 2 minutes)"
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@
