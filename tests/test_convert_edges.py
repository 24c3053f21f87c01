"""mva-build on legal inputs that were refused or stored wrong (review 10): an AnnData whose counts live only
in a layer (X=None), a CSC layer named as what it is, feature columns that only some inputs have (a scanpy bool,
an id only a later input has), a store shard written back as .h5mu (its masks), the GEX / ATAC feature types of
the NeurIPS 2021 multiome .h5ad, detection filters next to dropped cells, integer obs values past float32,
counts kept in adata.raw (layer: raw.X).

    .venv/bin/python -m pytest tests/test_convert_edges.py -q
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data.config import InputConfig
from tests.test_build_inputs import _build, _pair, _write_pair


def test_counts_only_in_a_layer_with_no_x_are_read(tmp_path):
    # adata.X = None (counts kept in layers['counts'] only) is a valid AnnData; it was refused as
    # "not an AnnData: no X" even with layer: counts
    rna, atac = _pair()
    want = rna.X.toarray()
    rna.layers["counts"] = rna.X.copy()
    rna.X = None
    inp = _write_pair(tmp_path, rna, atac)
    inp.layer = "counts"
    st = _build(tmp_path, [inp])
    np.testing.assert_array_equal(st.read_rows("rna", 0, 0, 6).toarray(), want)
    assert st.read_obs()["mask_rna"].all()


def test_no_x_and_no_layer_option_names_the_layers(tmp_path):
    rna, atac = _pair()
    rna.layers["counts"] = rna.X.copy()
    rna.X = None
    with pytest.raises(ValueError, match=r"rna.h5ad: no X .*layer.*'counts'"):
        _build(tmp_path, [_write_pair(tmp_path, rna, atac)])


def test_a_csc_layer_is_named_in_the_refusal(tmp_path):
    # the message said "X is stored as CSC" and told the user to convert adata.X, which was already CSR
    rna, atac = _pair()
    rna.layers["counts"] = sp.csc_matrix(rna.X)
    rna.X = rna.X.astype(np.float32) / 3
    inp = _write_pair(tmp_path, rna, atac)
    inp.layer = "counts"
    with pytest.raises(ValueError, match=r"layers\['counts'\] is stored as CSC.*layers\['counts'\] = "):
        _build(tmp_path, [inp])


@pytest.mark.parametrize("preshuffle", [False, True])
def test_a_bool_feature_column_stays_bool_where_an_input_lacks_it(tmp_path, preshuffle):
    # scanpy's var['highly_variable'] (numpy bool) of the first input only, feature_join=union: the gaps made it
    # an object column, stored as the text categories "False" / "True" (var[var.highly_variable == True] empty)
    rna, atac = _pair()
    rna.var["highly_variable"] = [True, False, True, False]
    rna2, atac2 = _pair(prefix="d", g=5)
    st = _build(tmp_path, [_write_pair(tmp_path, rna, atac, "a"), _write_pair(tmp_path, rna2, atac2, "b")],
                feature_join="union", preshuffle=preshuffle)
    hv = st.features["rna"]["highly_variable"]
    assert pd.api.types.is_bool_dtype(hv.dtype), hv.dtype
    assert hv.astype(object).where(hv.notna(), None).tolist() == [True, False, True, False, None]


@pytest.mark.parametrize("join", ["intersection", "union"])
def test_feature_columns_of_a_later_input_fill_what_the_first_lacks(tmp_path, join):
    # the first input provided every aligned feature's row, so a column only the second input has (gene_ids,
    # peak_type) was all-missing and dropped without a word, and a gene without an id in the first input kept
    # the gap though the second input names it
    rna, atac = _pair()
    rna.var["gene_ids"] = ["E0", np.nan, "E2", "E3"]
    rna.var["n_cells"] = pd.array([1, None, 3, 4], dtype="Int64")
    rna2, atac2 = _pair(prefix="d")
    rna2.var["gene_ids"] = ["X0", "E1", "X2", "X3"]  # the first input's value wins where it has one
    rna2.var["n_cells"] = pd.array([9, 2, 9, 9], dtype="Int64")
    rna2.var["score"] = [0.5, 1.5, 2.5, 3.5]
    rna2.var["hv"] = [True, False, False, True]
    atac2.var["peak_type"] = ["distal", "promoter", "distal"]
    st = _build(tmp_path, [_write_pair(tmp_path, rna, atac, "a"), _write_pair(tmp_path, rna2, atac2, "b")],
                feature_join=join)
    var = st.features["rna"]
    assert var["gene_ids"].astype(str).tolist() == ["E0", "E1", "E2", "E3"]
    np.testing.assert_array_equal(var["score"].to_numpy(), [0.5, 1.5, 2.5, 3.5])
    assert var["score"].dtype == np.float64
    assert var["n_cells"].dtype == "Int64" and var["n_cells"].tolist() == [1, 2, 3, 4]
    assert var["hv"].dtype == bool and var["hv"].tolist() == [True, False, False, True]
    assert st.features["atac"]["peak_type"].astype(str).tolist() == ["distal", "promoter", "distal"]


def test_an_h5mu_given_as_an_h5ad_names_the_kind(tmp_path):
    import mudata

    rna, atac = _pair()
    mudata.MuData({"rna": rna, "atac": atac}).write(tmp_path / "m.h5mu")
    inp = InputConfig(kind="h5ad_pair", rna=str(tmp_path / "m.h5mu"))
    with pytest.raises(ValueError, match="m.h5mu: is a MuData .*kind: h5mu"):
        _build(tmp_path, [inp])


@pytest.mark.parametrize("preshuffle", [False, True])
def test_a_store_shard_written_as_h5mu_keeps_its_masks(tmp_path, preshuffle):
    # a shard lists every cell in both modalities (empty rows where unmeasured; the masks are global obs
    # columns): mudata.read_zarr(shard).write(...) and a rebuild made every cell measured in both
    import mudata

    rna, atac = _pair()
    st = _build(tmp_path / "a", [_write_pair(tmp_path, rna[:4].copy(), atac[2:].copy())])
    want = st.read_obs()[["mask_rna", "mask_atac"]]
    assert want.to_numpy().sum() == 8  # 2 RNA-only, 2 paired, 2 ATAC-only
    mudata.read_zarr(st.shard_path(0)).write(tmp_path / "rt.h5mu")
    again = _build(tmp_path / "b", [InputConfig(kind="h5mu", path=str(tmp_path / "rt.h5mu"))], preshuffle=preshuffle)
    got = again.read_obs()[["mask_rna", "mask_atac"]].loc[want.index]
    pd.testing.assert_frame_equal(got, want)
    np.testing.assert_array_equal(again.meta.n_cells_rna, 4)


def test_scvi_layout_with_gex_atac_feature_types_is_split(tmp_path):
    # the NeurIPS 2021 BMMC multiome .h5ad (GSE194122) names its modalities var['feature_types'] = GEX / ATAC;
    # GEX was refused ("expected 'Gene Expression' or 'Peaks'") though .h5mu reading takes gex as RNA
    import anndata as ad

    rna, atac = _pair()
    var = pd.DataFrame({"feature_types": ["GEX"] * rna.n_vars + ["ATAC"] * atac.n_vars},
                       index=list(rna.var_names) + list(atac.var_names))
    ad.AnnData(sp.hstack([rna.X, atac.X], format="csr"), obs=rna.obs, var=var).write_h5ad(tmp_path / "bmmc.h5ad")
    st = _build(tmp_path, [InputConfig(kind="scvi", path=str(tmp_path / "bmmc.h5ad"), modality_key="feature_types")])
    assert st.meta.gene_names == list(rna.var_names) and st.meta.region_names == list(atac.var_names)
    np.testing.assert_array_equal(st.read_rows("rna", 0, 0, 6).toarray(), rna.X.toarray())
    np.testing.assert_array_equal(st.read_rows("atac", 0, 0, 6).toarray(), atac.X.toarray())


def test_scvi_layout_with_protein_features_is_still_refused(tmp_path):
    import anndata as ad

    rna, atac = _pair()
    var = pd.DataFrame({"modality": ["Gene Expression"] * 3 + ["Protein Expression"] + ["Peaks"] * atac.n_vars},
                       index=list(rna.var_names) + list(atac.var_names))
    ad.AnnData(sp.hstack([rna.X, atac.X], format="csr"), obs=rna.obs, var=var).write_h5ad(tmp_path / "dogma.h5ad")
    with pytest.raises(ValueError, match="feature 'g3' has modality 'Protein Expression'"):
        _build(tmp_path, [InputConfig(kind="scvi", path=str(tmp_path / "dogma.h5ad"))])


@pytest.mark.parametrize("preshuffle", [False, True])
def test_detection_filters_do_not_count_dropped_cells(tmp_path, preshuffle):
    # drop_empty_cells drops cells whose masks say neither modality was measured without checking their rows;
    # the filters counted those rows all the same, over the kept cells only: g0, detected in no written cell,
    # passed min_gene_fraction=0.5 with a "detection fraction" of 5 / 5
    import anndata as ad

    x = np.zeros((10, 5), np.int32)
    x[:, 1] = x[:, 4] = 1
    x[:5, 0] = 7  # only in the 5 cells measured in nothing
    obs = pd.DataFrame({"batch": ["b"] * 10, "mask_rna": [False] * 5 + [True] * 5,
                        "mask_atac": [False] * 5 + [True] * 5}, index=[f"c{i}" for i in range(10)])
    var = pd.DataFrame({"modality": ["Gene Expression"] * 3 + ["Peaks"] * 2},
                       index=["g0", "g1", "g2", "chr1:1-2", "chr1:3-4"])
    ad.AnnData(sp.csr_matrix(x), obs=obs, var=var).write_h5ad(tmp_path / "s.h5ad")
    st = _build(tmp_path, [InputConfig(kind="scvi", path=str(tmp_path / "s.h5ad"))], drop_empty_cells=True,
                min_gene_fraction=0.5, min_region_fraction=0.5, preshuffle=preshuffle)
    assert st.meta.gene_names == ["g1"] and st.meta.region_names == ["chr1:3-4"]
    assert st.meta.n_cells == 5


def test_integer_obs_values_that_differ_beyond_float32_are_refused(tmp_path):
    # the RNA / ATAC obs agreement check compared numbers as float32: donors 16777217 and 16777216 (any integer
    # ids past 2**24) were "equal", and the RNA obs silently won
    from data.validate import ValidationError

    rna, atac = _pair(obs={"donor": [16777217] * 6})
    atac.obs["donor"] = [16777216] * 6
    with pytest.raises(ValidationError, match=r"'donor' of cell 'c0' is .*16777217.* but .*16777216"):
        _build(tmp_path, [_write_pair(tmp_path, rna, atac)], batch_key="donor")
    # a float32 column and its float64 copy still agree
    rna, atac = _pair(obs={"batch": ["b"] * 6, "pct": np.full(6, 0.1, np.float32)})
    atac.obs["pct"] = np.full(6, 0.1, np.float32).astype(np.float64)
    assert _build(tmp_path / "b", [_write_pair(tmp_path, rna, atac, "y")], cont_cov_keys=["pct"]).meta.n_cells == 6


@pytest.mark.parametrize("kind", ["h5ad_pair", "h5mu"])
def test_counts_in_raw_are_read_with_layer_raw_x_and_its_own_genes(tmp_path, kind):
    # CELLxGENE and SeuratDisk files keep the counts in adata.raw (X normalised; after an HVG subset raw also
    # holds the genes X dropped): layer: raw.X reads raw/X with raw's own var, every gene of it
    import mudata

    rna, atac = _pair(g=5)
    counts = rna.X.toarray()
    rna.raw = rna
    rna = rna[:, [0, 2, 4]].copy()  # an HVG subset: X keeps 3 of the 5 genes
    rna.X = sp.csr_matrix(np.log1p(rna.X.toarray() / 3.0))
    if kind == "h5mu":
        mudata.MuData({"rna": rna, "atac": atac}).write_h5mu(tmp_path / "x.h5mu")
        inp = InputConfig(kind="h5mu", path=str(tmp_path / "x.h5mu"))
    else:
        inp = _write_pair(tmp_path, rna, atac)
    with pytest.raises(ValueError, match="not an integer"):
        _build(tmp_path, [inp])
    inp.layer = "raw.X"
    st = _build(tmp_path, [inp])
    assert list(st.meta.gene_names) == [f"g{j}" for j in range(5)]
    np.testing.assert_array_equal(st.read_rows("rna", 0, 0, 6).toarray(), counts)
    np.testing.assert_array_equal(st.read_rows("atac", 0, 0, 6).toarray(), atac.X.toarray())  # read from X
