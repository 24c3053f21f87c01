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
	$(BIN)/python scripts/bench/step_floor.py --epochs-json outputs/bench/train.json

# Quality harness (docs/quality.md): ours vs scvi-tools MULTIVI, paired fractions 1/0.5/0.25/0.1, 3 seeds.
# Epochs: about 500 optimizer steps for BMMC (4 steps/epoch) and PBMC (8); 1,500 for the synthetic atlas
# (5 steps/epoch), where 500 steps left the RNA library network short of converged (docs/quality.md).
SHARED ?= ../shared/data
QUALITY_ARGS ?=
quality: setup
	$(BIN)/python scripts/bench/quality.py --epochs 120 $(QUALITY_ARGS) --out outputs/quality/bmmc \
		--batch-key batch --label-key cell_type \
		--rna $(SHARED)/neurips2021_bmmc_multiome_starter/bmmc_starter_rna.h5ad \
		--atac $(SHARED)/neurips2021_bmmc_multiome_starter/bmmc_starter_atac.h5ad
	$(BIN)/python scripts/bench/quality.py --epochs 60 $(QUALITY_ARGS) --out outputs/quality/pbmc \
		--rna $(SHARED)/pbmc_10x_multiome_muon_testsubset/pbmc_muon_test_rna.h5ad \
		--atac $(SHARED)/pbmc_10x_multiome_muon_testsubset/pbmc_muon_test_atac.h5ad
	$(BIN)/python scripts/bench/quality.py --epochs 300 $(QUALITY_ARGS) --out outputs/quality/synthetic \
		--synthetic --synthetic-cells 600

clean:
	rm -rf outputs multirun .pytest_cache
