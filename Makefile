# Two commands: `make demo` and `make test`. Both set up .venv on their own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
ARGS ?=
# Every extra but the aggregates; the development tools are the PEP 735 group `dev`.
EXTRAS := sqlite,postgres,redis,server,cli,testing,bench

.PHONY: help test lint types unit docs docs-strict demo bench soak build release publish clean

help:
	@echo "make demo     - mock partner + example service + simulated app (SQLite), prints a summary"
	@echo "make test     - ruff, ruff format --check, mypy --strict, mkdocs --strict, the pytest suite"
	@echo "make bench    - benchmarks into bench-results/ (ARGS=--quick for a short run)"
	@echo "make soak     - 5-minute soak: service SIGKILLed every 3-10 s under load (ARGS=--minutes N, --signal TERM)"
	@echo "make docs     - the documentation site into site/ (open site/index.html)"
	@echo "make build    - wheel and sdist into dist/ (version from the git tag), twine check"
	@echo "make release VERSION=x.y.z - CHANGELOG [Unreleased] -> [x.y.z], commit, tag vx.y.z"
	@echo "make publish  - build and upload dist/* with twine to TWINE_REPOSITORY_URL or"
	@echo "                TWINE_REPOSITORY (.pypirc); credentials from the environment or keyring"
	@echo "See docs/releasing.md."

# pip >= 25.1 installs dependency groups (--group); the upgrade comes first for that.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade 'pip>=25.1'
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]' --group dev
	@touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy --strict src

unit: $(STAMP)
	$(BIN)/pytest $(ARGS)

# Strict: a broken link or reference, and a public name without an API entry, fail the build.
docs-strict: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The docs build (about 10 s, quiet unless it fails) runs beside the pytest suite.
test: lint types
	@$(MAKE) --no-print-directory -j2 docs-strict unit

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	@echo "open site/index.html"

demo: $(STAMP)
	$(BIN)/resilient-payout demo $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

soak: $(STAMP)
	$(BIN)/resilient-payout soak $(ARGS)

build: $(STAMP)
	rm -rf dist && $(BIN)/python -m build
	$(BIN)/twine check --strict dist/*

release: $(STAMP)
	@test -n "$(VERSION)" || { echo "usage: make release VERSION=x.y.z" >&2; exit 2; }
	$(BIN)/python scripts/release.py cut $(VERSION)

# twine reads TWINE_REPOSITORY_URL / TWINE_REPOSITORY and TWINE_USERNAME / TWINE_PASSWORD (or the
# keyring) itself: nothing secret goes on a command line. scripts/release.py refuses a build
# that is not exactly a release tag, and an upload target that is not named.
publish: build
	$(BIN)/python scripts/release.py publish

clean:
	rm -rf $(VENV) dist build site .pytest_cache .mypy_cache .ruff_cache .hypothesis bench-results .demo .soak
