# Two commands do all the set-up on a fresh clone:
#   make bench   -- the main job: the quick benchmark on the device at hand
#   make test    -- the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bench test setup
bench: setup
	$(PY) -m benchmarks

test: setup
	$(PY) -m pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py requirements-dev.txt $(wildcard cpu/*.pyx cpu/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@
