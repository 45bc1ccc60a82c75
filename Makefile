# Quick start: `make run` processes the bundled samples on the embedded default;
# `make test` runs the whole test suite.  Both set themselves up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup lint clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/sqapi process samples/messages.jsonl

test: $(STAMP)
	bash scripts/test.sh

lint: $(STAMP)
	$(BIN)/ruff check sqapi plugins tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .sqapi .pytest_cache .mypy_cache
