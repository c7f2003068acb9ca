# `make demo` and `make test` work on a fresh clone: each builds .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench-speed results-elpv

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

# docs/results/elpv.md: the ELPV grid (resumable: finished runs are skipped; ~2.5 h from scratch on 2 cores)
# and the report written into the page's generated section.
results-elpv: $(STAMP)
	$(BIN)/rifle bench benchmarks/elpv_grid.yaml --out docs/results/elpv
	$(BIN)/rifle report docs/results/elpv --page docs/results/elpv.md

clean:
	rm -rf runs .pytest_cache
