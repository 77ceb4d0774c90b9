# inspectd: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv and install what is missing first (scripts/setup.sh).
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh tests/plugins/inspectd_example_scorer/pyproject.toml
	bash scripts/setup.sh $(VENV)

demo: setup
	$(BIN)/inspectd demo --out $(OUT)/demo

test: setup
	$(BIN)/ruff check sensors workers daemon tools tests
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check sensors workers daemon tools tests

clean:
	rm -rf $(OUT) .pytest_cache
