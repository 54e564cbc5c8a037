# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned first and on its own, so pip takes the local CPU wheel and never CUDA builds.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q torch==2.13.0 -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m difflab.demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=10

clean:
	rm -rf $(VENV) runs out
