"""mva-build on inputs a review found mishandled (each test fails on the code before its fix): a bool
feature column, an input whose modality file has no cells, counts past uint32, obs keys with '/', a
contradicting scvi n_genes, one file given as both modalities.

    .venv/bin/python -m pytest tests/test_build_audit.py -q
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data.build import build_store
from data.config import BuildConfig, InputConfig
from data.store import open_store
from data.typed_config import ConfigError
from data.validate import ValidationError

PEAKS = [f"chr1:{i}00-{i}50" for i in range(6)]


def _h5(path, ids, feats=None, var=None, x=None):
    var = var if var is not None else pd.DataFrame(index=feats)
    x = x if x is not None else sp.csr_matrix(np.ones((len(ids), len(var)), np.int32))
    ad.AnnData(x, obs=pd.DataFrame({"batch": ["b"] * len(ids)}, index=ids), var=var).write_h5ad(path)
    return str(path)


def _build(tmp_path, inputs, **kw):
    out = tmp_path / "s.zarr"
    return open_store(build_store(BuildConfig(out=str(out), progress=False, inputs=inputs, **kw)))


def test_a_bool_feature_column_stays_bool_when_another_input_lacks_it(tmp_path):
    """scanpy's highly_variable in one input only: written as the text 'True'/'False', which astype(bool)
    reads as True for every gene."""
    hv = pd.DataFrame({"highly_variable": [True, False, True]}, index=["g0", "g1", "g2"])
    one = _h5(tmp_path / "one.h5ad", ["a", "b"], var=hv)
    two = _h5(tmp_path / "two.h5ad", ["c", "d"], ["g0", "g1", "g2"])
    st = _build(tmp_path, [InputConfig(kind="h5ad_pair", rna=one), InputConfig(kind="h5ad_pair", rna=two)])
    col = st.features["rna"]["highly_variable"]
    assert col.dtype == bool and col.tolist() == [True, False, True]


def test_a_modality_file_with_no_cells_does_not_vote_on_the_features(tmp_path):
    """An h5ad_pair whose ATAC file has 0 cells (every cell failed QC) removed, under intersection, the peaks the
    other input measured (README: an input with 0 cells takes no part in feature_join)."""
    r1, a1 = _h5(tmp_path / "r1.h5ad", ["a", "b"], ["g0", "g1"]), _h5(tmp_path / "a1.h5ad", [], PEAKS[:2])
    r2, a2 = _h5(tmp_path / "r2.h5ad", ["c", "d"], ["g0", "g1"]), _h5(tmp_path / "a2.h5ad", ["c", "d"], PEAKS)
    inputs = [InputConfig(kind="h5ad_pair", rna=r1, atac=a1), InputConfig(kind="h5ad_pair", rna=r2, atac=a2)]
    st = _build(tmp_path, inputs)
    assert list(st.meta.region_names) == PEAKS
    obs = st.read_obs()
    assert obs["mask_atac"].tolist() == [False, False, True, True]
    union = open_store(build_store(BuildConfig(out=str(tmp_path / "u.zarr"), progress=False, inputs=inputs,
                                               feature_join="union")))
    assert list(union.meta.region_names) == PEAKS


@pytest.mark.parametrize("value, dtype", [(5_000_000_000, np.int64), (1e20, np.float64), (2**32, np.float32)])
def test_a_count_past_uint32_is_refused_naming_the_cell(tmp_path, value, dtype):
    """Stored as uint64 (docs/store.md: uint8/16/32), or refused after the whole pass naming no cell or file."""
    x = sp.csr_matrix(np.array([[1, 2], [value, 1]], dtype=dtype))
    path = _h5(tmp_path / "big.h5ad", ["a", "b"], ["g0", "g1"], x=x)
    with pytest.raises(ValidationError, match=r"big.h5ad: rna count of cell 'b', feature 'g0'.*above 4,294,967,295"):
        _build(tmp_path, [InputConfig(kind="h5ad_pair", rna=path)])
    top = 2**32 - 1 if dtype != np.float32 else 2**31  # float32 cannot hold 2^32 - 1 (it rounds to 2^32)
    ok = sp.csr_matrix(np.array([[1, 2], [top, 1]], dtype=dtype))
    st = _build(tmp_path, [InputConfig(kind="h5ad_pair", rna=_h5(tmp_path / "ok.h5ad", ["a", "b"], ["g0", "g1"], x=ok))])
    assert st.root["shards/00000/mod/rna/X/data"].dtype == np.uint32 and st.read_rows("rna", 0, 1, 2)[0, 0] == top


@pytest.mark.parametrize("option", ["batch_key", "label_key", "cat_cov_keys", "cont_cov_keys"])
def test_an_obs_key_with_a_slash_is_refused_at_start(option):
    value = ["donor/id"] if option.endswith("keys") else "donor/id"
    with pytest.raises(ConfigError, match=f"{option} 'donor/id'.*cannot contain '/'"):
        BuildConfig(out="x", inputs=[InputConfig(kind="h5ad_pair", rna="r.h5ad")], **{option: value})


def test_scvi_n_genes_that_contradicts_the_modality_column_is_refused(tmp_path):
    var = pd.DataFrame({"modality": ["Gene Expression"] * 5 + ["Peaks"] * 6},
                       index=[f"g{i}" for i in range(5)] + PEAKS)
    path = _h5(tmp_path / "scvi.h5ad", ["a", "b"], var=var)
    with pytest.raises(ValueError, match=r"n_genes=3, but var\['modality'\] names 5 genes"):
        _build(tmp_path, [InputConfig(kind="scvi", path=path, n_genes=3)])
    assert _build(tmp_path, [InputConfig(kind="scvi", path=path, n_genes=5)]).meta.n_genes == 5


def test_one_file_as_both_modalities_is_refused(tmp_path):
    path = _h5(tmp_path / "same.h5ad", ["a", "b"], ["g0", "g1"])
    with pytest.raises(ValueError, match="given as both rna and atac"):
        _build(tmp_path, [InputConfig(kind="h5ad_pair", rna=path, atac=str(tmp_path / "." / "same.h5ad"))])


def test_names_that_are_both_genes_and_peaks_are_warned_about(tmp_path, caplog):
    """Legal, but usually a mistake (helper audit): shards then have non-unique MuData var names."""
    import logging

    rna = _h5(tmp_path / "r.h5ad", ["a", "b"], ["g0", "shared"])
    atac = _h5(tmp_path / "a.h5ad", ["a", "b"], ["shared", PEAKS[0]])
    with caplog.at_level(logging.WARNING):
        st = _build(tmp_path, [InputConfig(kind="h5ad_pair", rna=rna, atac=atac)])
    assert "1 feature names are both genes and peaks (e.g. ['shared'])" in caplog.text
    assert list(st.meta.gene_names) == ["g0", "shared"] and list(st.meta.region_names) == ["shared", PEAKS[0]]
