# Set-up and entry points. Everything installs into ./.venv; torch is pinned to the local CPU wheel
# (constraints.txt), so a fresh machine without a GPU or internet access beyond PyPI works.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.netprobe-installed
# Two cores here: torch's intra-op threads contend badly, so demos and tests use one thread.
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

.PHONY: setup demo test test-fast lint docs bench clean

setup: $(STAMP)

# editable_mode=compat puts the source root on sys.path (a .pth) instead of an import hook, so that
# `python -m netprobe` run from the directory above a clone named netprobe imports the package, not
# the clone as a namespace package (which a strict editable install's hook loses to).
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]" --config-settings editable_mode=compat
	touch $(STAMP)

demo: setup
	$(BIN)/python examples/demo.py

test: setup
	$(BIN)/python -m pytest -q --timeout=900

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check netprobe tests examples benchmarks

# the docs site (docs/ + the API from the docstrings), warnings as errors; open site/index.html
docs: $(VENV)/.netprobe-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

$(VENV)/.netprobe-docs: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[docs]" --config-settings editable_mode=compat
	touch $(VENV)/.netprobe-docs

bench: setup
	$(BIN)/python benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache site
