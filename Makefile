# Two commands: `make demo` and `make test`. Both set up .venv on their own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
ARGS ?=

.PHONY: help test lint types unit demo bench soak build clean

help:
	@echo "make demo   - mock partner + example service + simulated app (SQLite), prints a summary"
	@echo "make test   - ruff, ruff format --check, mypy --strict, the whole pytest suite"
	@echo "make bench  - benchmarks into bench-results/ (ARGS=--quick for a short run)"
	@echo "make soak   - 5-minute soak: service SIGKILLed every 3-10 s under load (ARGS=--minutes N)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy --strict src

unit: $(STAMP)
	$(BIN)/pytest $(ARGS)

test: lint types unit

demo: $(STAMP)
	$(BIN)/resilient-payout demo $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

soak: $(STAMP)
	$(BIN)/resilient-payout soak $(ARGS)

build: $(STAMP)
	rm -rf dist && $(BIN)/python -m build

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache .hypothesis bench-results .demo .soak
