# flowdsl — developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint goldens bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,llm]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.demo

lint: $(STAMP)
	$(BIN)/ruff check flowdsl tests examples benchmarks
	$(BIN)/mypy

# The suite on every core (at most 4): each pytest-xdist worker starts a private redis-server of its own.
test: lint
	LITELLM_LOCAL_MODEL_COST_MAP=True $(BIN)/python -m pytest -n auto --maxprocesses 4 --dist worksteal

# Regenerate every golden file (plans, diagnostics, diagrams) from the current code.
goldens: $(STAMP)
	$(BIN)/python -m pytest --update-goldens -q

# Every benchmark script in turn; each prints its figures (recorded by hand in benchmarks/RESULTS.md).
bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python -m benchmarks.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf $(VENV) build dist .flowdsl
