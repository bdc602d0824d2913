# `make demo` and `make test` do all the set-up on first use: a .venv with bytemamba and its pins.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	rm -rf runs/demo
	$(BIN)/bytemamba train recipes/text_default.toml train.out_dir=runs/demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
