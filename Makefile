# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

# setup.py compiles the relay with mypyc, next to its sources: edits to them reinstall.
$(BIN)/rolehost: pyproject.toml setup.py rolehost/balancer/proxy/*.py rolehost/balancer/__init__.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

.PHONY: demo test test-fast lint bench docs clean
# `make demo SAMPLE=fastapi` runs another of samples/ (a comment on the line would pad it).
SAMPLE ?= hello
demo: $(BIN)/rolehost  ## run a sample in the foreground (Ctrl-C stops it gracefully)
	cd samples/$(SAMPLE) && ../../$(BIN)/rolehost start

# Three workers on two cores: most tests wait on real processes rather than compute. By
# file, so that a module's fixture (one controller for several tests) is started once.
PARALLEL ?= -n 3 --dist loadfile

test: lint  ## everything CI runs: lint, types, the whole suite (slow tests included)
	$(BIN)/pytest $(PARALLEL)

test-fast: $(BIN)/rolehost  ## the suite without tests marked slow
	$(BIN)/pytest $(PARALLEL) -m 'not slow'

lint: $(BIN)/rolehost
	$(BIN)/ruff check rolehost tests samples bench docs setup.py conftest.py
	$(BIN)/mypy

bench: $(BIN)/rolehost
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/respawn.py

docs: $(BIN)/rolehost  ## regenerate the reference pages, and the portal's screenshots
	$(BIN)/python docs/generate.py
	ROLEHOST_PORTAL_SCREENSHOTS=$(CURDIR)/docs $(BIN)/pytest -q -p no:cacheprovider \
		tests/test_portal.py::test_the_portal_in_a_browser \
		tests/test_portal_slots.py::test_the_portal_shows_staging_swaps_and_memory

clean:
	rm -rf $(VENV) .rolehost samples/*/.rolehost
