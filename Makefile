# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-dev lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,ray]'

# A second `make demo` keeps the first run and writes the next free runs/demo-digits-N.
demo: install
	@name=demo-digits; i=1; while [ -e runs/$$name ]; do i=$$((i + 1)); name=demo-digits-$$i; done; \
	echo "$(BIN)/fedslim run examples/demo_digits.yaml --name $$name"; \
	$(BIN)/fedslim run examples/demo_digits.yaml --name $$name

test: install-dev
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check fedslim tests bench

bench: install-dev
	$(BIN)/python bench/engine_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
