# Two commands do all the set-up on a fresh clone:
#   make bench   -- the main job: the quick benchmark on the device at hand
#   make test    -- the test suite (what CI runs; CELOSS_SKIP_PACKAGING_TEST=1 skips the wheel build test)
# CI also runs `make test-triton-newest`: the Triton kernels in the interpreter on the newest Triton the
# package admits (pyproject.toml), beside the pinned one of requirements-dev.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

NEWEST_TRITON := 3.9.0
NEWEST_VENV := .venv-triton-newest
# the interpreter tests; the ahead-of-time compile gates target the GPU machine's pinned Triton
NEWEST_SELECT := -k "not aot and not spill and not compiles"

.PHONY: bench test test-triton-newest setup
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

# A non-editable install without the C extension: the Triton kernels are all these tests need. pytest runs
# from tests/ so that the installed package, not the source folder, is imported.
test-triton-newest:
	@test -x $(NEWEST_VENV)/bin/python || { echo "== creating $(NEWEST_VENV) (triton $(NEWEST_TRITON))"; $(PYTHON) -m venv $(NEWEST_VENV); }
	$(NEWEST_VENV)/bin/python -m pip install -q torch==2.13.0 triton==$(NEWEST_TRITON) numpy pytest pytest-timeout psutil \
		"setuptools>=77" wheel
	CELOSS_NO_EXT=1 $(NEWEST_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps --force-reinstall .
	cd tests && TRITON_INTERPRET=1 ../$(NEWEST_VENV)/bin/pytest -q -p no:cacheprovider kernels $(NEWEST_SELECT)
