# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
PIP := $(BIN)/pip install --disable-pip-version-check -q -c requirements/constraints.txt
export OMP_NUM_THREADS ?= 1

.PHONY: setup test test-fast demo bench quality clean

setup: $(STAMP)

# torch first and pinned: anything that pulls torch unpinned would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements/constraints.txt requirements/reference.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) -r requirements/reference.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --ignore-requires-python scvi-tools==1.5.1
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	bash scripts/demo.sh

bench: setup
	$(BIN)/python scripts/bench/model_step.py
	$(BIN)/python scripts/bench/loader.py
	$(BIN)/python scripts/bench/train.py

clean:
	rm -rf outputs multirun .pytest_cache
