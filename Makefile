# Two commands for a newcomer: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: help install system-deps demo test lint types pytest soak bench clean

help:
	@echo "make demo   - start a collector, run the example apps under real servers, print a summary"
	@echo "make test   - ruff, mypy (strict) and the whole pytest suite"
	@echo "make bench  - the benchmark against the bare apps and the peers (writes BENCHMARKS.md)"
	@echo "make soak   - the 10-minute soak per framework against a flaky collector"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e . --group test --group lint
	touch $(STAMP)

install: $(STAMP)

# Chromium and PostgreSQL from Debian, for the browser and PostgreSQL tests (apt-get when root).
system-deps:
	bash scripts/system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) system-deps
	$(BIN)/pytest

test: lint types pytest

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# make bench BENCH_ARGS=--quick for a ~2-minute smoke run (written under benchmarks/results/).
bench: system-deps
	PYTHON=$(PYTHON) bash benchmarks/setup.sh
	benchmarks/.venv/bin/python benchmarks/run.py $(BENCH_ARGS)

soak: $(STAMP)
	$(BIN)/python scripts/soak.py --minutes 10 --framework all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .demo
