"""mva-synth / mva-build values that were accepted and then wrote a wrong store, were ignored, or failed late
without naming the key are refused when the config is read.

    .venv/bin/python -m pytest tests/test_config_data_values.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data.config import BuildConfig, InputConfig, SynthConfig
from data.synthetic import write_synthetic_store
from data.typed_config import ConfigError, to_typed
from tests.train_utils import env

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")


def _load(name: str, schema, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return to_typed(compose(config_name=name, overrides=list(overrides)), schema)


@pytest.mark.parametrize("override,key", [
    ("peak_fold=inf", "peak_fold"),  # every ATAC count of every cell in region 0 (see the test below)
    ("marker_fold=inf", "marker_fold"),  # these ended in numpy's 'lam value too large'
    ("rna_library_median=inf", "rna_library_median"),
    ("atac_density=inf", "atac_density"),
    ("batch_effect=inf", "batch_effect"),
    ("paired_fraction=nan", "paired_fraction"),  # 'Probabilities contain NaN'
])
def test_synth_non_finite_values_are_named(override, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number"):
        _load("synth", SynthConfig, override)


def test_synth_library_medians_that_overflow_int32_counts_are_named():
    # 1e12 wrapped the int32 draws: stored counts up to 4,294,825,036 and a smallest library of 362,463
    with pytest.raises(ConfigError, match=r"^rna_library_median must be <= 1e7"):
        _load("synth", SynthConfig, "rna_library_median=1e12")
    assert _load("synth", SynthConfig, "rna_library_median=1e7").rna_library_median == 1e7


def test_synth_infinite_peak_fold_no_longer_writes_a_one_region_store(tmp_path):
    # before: exit 0, 'wrote ...', a store whose ATAC counts all sat in region 0 (300 cells, 100 regions)
    r = subprocess.run([sys.executable, "-m", "data.synthetic", f"out={tmp_path / 's'}", "n_cells=300", "n_genes=50",
                        "n_regions=100", "progress=false", "peak_fold=inf"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.strip() == "mva-synth: error: peak_fold must be a finite number, got inf"
    assert not (tmp_path / "s").exists()
    write_synthetic_store(tmp_path / "ok", n_cells=50, n_genes=20, n_regions=40, progress=False, peak_fold=1e3)


B = ("out=/o",)


@pytest.mark.parametrize("overrides,key", [
    (("min_gene_fraction=-0.1",), "min_gene_fraction"),  # silently no filter
    (("min_region_fraction=1.5",), "min_region_fraction"),  # refused only after reading every input
    (("min_gene_fraction=nan",), "min_gene_fraction"),
    # the store carried cell_type twice (n_cats_per_cov (21, 21)), and so did every model trained on it
    (("cat_cov_keys=[cell_type,cell_type]",), r"covariate keys \['cell_type'\]"),
    (("cat_cov_keys=[site]", "cont_cov_keys=[site]"), r"covariate keys \['site'\]"),
    # options of another input kind were ignored
    (("inputs=[{kind: h5ad_pair, rna: r.h5ad, n_genes: 5}]",), "n_genes=5"),
    (("inputs=[{kind: h5ad_pair, rna: r.h5ad, path: m.h5mu}]",), "path='m.h5mu'"),
    (("inputs=[{kind: h5mu, path: m.h5mu, atac: a.h5ad}]",), "atac='a.h5ad'"),
    (("inputs=[{kind: tenx_h5, path: f.h5, modality_key: feature_types}]",), "modality_key='feature_types'"),
])
def test_build_bad_or_ignored_values_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key):
        _load("build", BuildConfig, *B, *overrides)


@pytest.mark.parametrize("overrides", [
    ("min_gene_fraction=0", "min_region_fraction=1"), ("cat_cov_keys=[site]", "cont_cov_keys=[pct_mito]"),
    ("inputs=[{kind: scvi, path: s.h5ad, n_genes: 5, modality_key: ft}]",),
    ("inputs=[{kind: h5ad_pair, rna: r.h5ad, atac: a.h5ad, layer: counts, batch: b, id_prefix: p_}]",),
    ("inputs=[{kind: odd, path: x}]",),  # an unknown kind is named by open_input, with the kinds
])
def test_build_valid_values_stay_valid(overrides):
    _load("build", BuildConfig, *B, *overrides)


def test_python_inputs_are_checked_too():
    with pytest.raises(ConfigError, match="rna=.r.h5ad. does not apply to kind=h5mu"):
        InputConfig(kind="h5mu", path="m.h5mu", rna="r.h5ad")
