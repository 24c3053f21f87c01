"""mva-build on inputs whose modality masks or per-cell values were read wrong without a word (review 9):
an AnnData of a modality with no features, one mask column in the scvi layout, obs tables of one input that
disagree about a cell (RNA vs ATAC obs, a modality's obs vs an .h5mu's global obs).

    .venv/bin/python -m pytest tests/test_store_inputs.py -q
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data.config import InputConfig
from data.validate import ValidationError
from tests.test_build_inputs import _build, _pair, _write_pair


def _no_genes(rna: ad.AnnData) -> ad.AnnData:
    """The same cells with an empty gene table (an ATAC-only dataset written as a pair)."""
    return ad.AnnData(sp.csr_matrix((rna.n_obs, 0), dtype=np.int32), obs=rna.obs.copy())


def test_an_anndata_without_features_measures_nothing_in_that_modality(tmp_path):
    # an RNA file with no genes marked its cells RNA-measured: with a second input that has genes, those
    # cells became RNA-measured with all-zero rows and the model was trained on them as such
    import mudata

    rna, atac = _pair()
    rna2, atac2 = _pair(prefix="d", seed=1)
    st = _build(
        tmp_path, [_write_pair(tmp_path, _no_genes(rna), atac, "a"), _write_pair(tmp_path, rna2, atac2, "b")]
    )
    obs = st.read_obs()
    assert st.meta.n_genes == 4 and st.meta.n_cells_rna == 6
    assert obs["mask_rna"].to_dict() == {
        **{f"c{i}": False for i in range(6)},
        **{f"d{i}": True for i in range(6)},
    }
    assert obs["mask_atac"].all()
    mudata.MuData({"rna": _no_genes(rna), "atac": atac}).write(tmp_path / "m.h5mu")
    obs = _build(tmp_path / "mu", [InputConfig(kind="h5mu", path=str(tmp_path / "m.h5mu"))]).read_obs()
    assert not obs["mask_rna"].any() and obs["mask_atac"].all()


def _scvi(path, obs):
    n = len(obs)
    genes = np.ones((n, 3), np.int32)
    peaks = np.where(obs["has_atac"].to_numpy()[:, None], 1, 0).astype(np.int32).repeat(2, axis=1)
    var = pd.DataFrame(
        {"modality": ["Gene Expression"] * 3 + ["Peaks"] * 2},
        index=["g0", "g1", "g2", "chr1:1-2", "chr1:3-4"],
    )
    ad.AnnData(
        sp.csr_matrix(np.hstack([genes, peaks])), obs=obs.drop(columns="has_atac"), var=var
    ).write_h5ad(path)
    return InputConfig(kind="scvi", path=str(path))


@pytest.mark.parametrize("second", [None, "modality"])
def test_one_mask_column_of_the_scvi_layout_is_read(tmp_path, second):
    # obs with mask_atac but no mask_rna: both were ignored and every cell stored as paired, the RNA-only
    # cells ATAC-measured with no peaks
    has = np.array([True] * 3 + [False] * 3)
    obs = pd.DataFrame(
        {"batch": ["b"] * 6, "mask_atac": has, "has_atac": has}, index=[f"c{i}" for i in range(6)]
    )
    if second:  # the scvi-tools column decides the modality without a mask column
        obs["modality"] = ["paired"] * 3 + ["expression"] * 3
    st = _build(tmp_path, [_scvi(tmp_path / "s.h5ad", obs)])
    got = st.read_obs()
    assert got["mask_atac"].tolist() == has.tolist() and got["mask_rna"].all()
    assert st.meta.n_cells_atac == 3


def test_obs_values_that_disagree_between_the_tables_of_an_input_are_refused(tmp_path):
    # a paired cell's batch came from the RNA obs, the ATAC obs's other value was ignored; in an .h5mu the
    # modality obs won over the global obs (what MuData and scvi-tools read), both silently
    import mudata

    rna, atac = _pair(obs={"batch": ["b0"] * 6})
    atac.obs["batch"] = ["b0"] * 5 + ["b1"]
    with pytest.raises(
        ValidationError,
        match=r"obs column 'batch' of cell 'c5' is 'b0' in .*rna\.h5ad obs but "
        r"'b1' in .*atac\.h5ad obs \(1 cells differ\)",
    ):
        _build(tmp_path, [_write_pair(tmp_path, rna, atac, "p")])
    rna, atac = _pair(obs={"batch": ["b0"] * 6})
    md = mudata.MuData({"rna": rna, "atac": atac})
    md.obs["batch"] = ["b1"] * 6
    md.write(tmp_path / "m.h5mu")
    with pytest.raises(
        ValidationError, match=r"'b0' in .*mod/rna obs but 'b1' in .*global obs \(6 cells differ\)"
    ):
        _build(tmp_path / "mu", [InputConfig(kind="h5mu", path=str(tmp_path / "m.h5mu"))])
    # a column the build does not use may differ; values that agree (1 vs "1", 0.5 as float32 vs float64) pass
    rna, atac = _pair(obs={"batch": [1] * 6, "qc": [1.0] * 6, "pct": np.full(6, 0.5, np.float32)})
    atac.obs["batch"], atac.obs["qc"], atac.obs["pct"] = ["1"] * 6, [2.0] * 6, np.full(6, 0.5)
    st = _build(tmp_path / "ok", [_write_pair(tmp_path, rna, atac, "ok")], cont_cov_keys=["pct"])
    assert st.meta.batch_categories == ["1"]


@pytest.mark.parametrize("preshuffle", [False, True])
def test_a_column_only_the_atac_obs_has_reaches_the_paired_cells(tmp_path, preshuffle):
    # labels only in the ATAC file: the paired cells (taken from the RNA obs) got none, and with no other
    # input having the column the build said no input had it
    rna, atac = _pair()
    atac.obs["cell_type"] = ["T", "B", "T", "NK", "B", "T"]
    rna, atac = rna[:4].copy(), atac[2:].copy()  # c0, c1 RNA-only; c2, c3 paired; c4, c5 ATAC-only
    st = _build(tmp_path, [_write_pair(tmp_path, rna, atac)], label_key="cell_type", preshuffle=preshuffle)
    obs = st.read_obs()
    labels = obs["cell_type"].astype(object).where(obs["cell_type"].notna(), None).to_dict()
    assert labels == {"c0": None, "c1": None, "c2": "T", "c3": "NK", "c4": "B", "c5": "T"}


def test_feature_columns_with_missing_values_are_kept_with_their_gaps(tmp_path):
    # one gene without an id dropped the whole gene_ids column, as did feature_join=union for a column only
    # the first input has; written as-is, anndata would store a missing text as the text "nan"
    rna, atac = _pair()
    rna.var["gene_ids"] = ["E0", "E1", np.nan, "E3"]
    rna.var["score"] = [1.0, np.nan, 2.0, 3.0]
    rna.var["hv"] = pd.array([True, None, False, True], dtype="boolean")
    rna2, atac2 = _pair(prefix="d", g=5)  # a fifth gene the first input does not have
    st = _build(
        tmp_path,
        [_write_pair(tmp_path, rna, atac, "a"), _write_pair(tmp_path, rna2, atac2, "b")],
        feature_join="union",
    )
    var = st.features["rna"]
    assert list(var.index) == ["g0", "g1", "g2", "g3", "g4"]
    assert var["gene_ids"].astype(object).where(var["gene_ids"].notna(), None).tolist() == [
        "E0",
        "E1",
        None,
        "E3",
        None,
    ]
    np.testing.assert_array_equal(var["score"].to_numpy(), [1.0, np.nan, 2.0, 3.0, np.nan])
    assert var["hv"].astype(object).where(var["hv"].notna(), None).tolist() == [True, None, False, True, None]
    assert ad.read_zarr(st.shard_path(0) / "mod" / "rna").var["gene_ids"].isna().tolist() == [
        False,
        False,
        True,
        False,
        True,
    ]
