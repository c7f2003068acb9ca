# `make demo` and `make test` work on a fresh clone: each builds .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench-speed

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/rifle demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/speed.py --out docs/performance.md
	$(BIN)/python benchmarks/cpu_options.py --out docs/performance-options.md

clean:
	rm -rf runs .pytest_cache
