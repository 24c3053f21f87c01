"""mva-build on awkward inputs a converter review (session 21) found stored wrong or refused with a traceback:
a genes-and-peaks file given as one modality of an h5ad_pair, mask columns in the pair files' own obs, a batch
column named like one of the store's own, a 10x .h5 without feature types, float16 counts, duplicate CSR
entries whose sum overflows the file's integer type.

    .venv/bin/python -m pytest tests/test_convert_awkward.py -q
"""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data.config import InputConfig
from data.validate import ValidationError
from tests.test_build_inputs import _build, _pair, _write_pair
from tests.test_convert import _write_tenx_h5


def test_a_genes_and_peaks_file_given_as_one_modality_is_refused(tmp_path):
    # given as rna=, its peaks became genes (exit 0, a "0 regions" warning only): only a file whose every
    # feature was the other modality (swapped) was refused
    rna, atac = _pair()
    both = ad.concat([rna, atac], axis=1)
    both.obs = rna.obs.copy()
    both.var["feature_types"] = ["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars
    both.write_h5ad(tmp_path / "both.h5ad")
    with pytest.raises(ValueError, match=r"both.h5ad: given as rna, but its var\['feature_types'\] names 3 of its "
                                         r"7 features 'Peaks' \(peaks\): a file with genes and peaks .*kind=scvi"):
        _build(tmp_path, [InputConfig(kind="h5ad_pair", rna=str(tmp_path / "both.h5ad"))])
    with pytest.raises(ValueError, match=r"given as atac, but .* names 4 of its 7 features 'Gene Expression'"):
        _build(tmp_path, [InputConfig(kind="h5ad_pair", atac=str(tmp_path / "both.h5ad"))])
    # the same file as what it is builds, split by the column
    st = _build(tmp_path, [InputConfig(kind="scvi", path=str(tmp_path / "both.h5ad"), modality_key="feature_types")])
    assert (st.meta.n_genes, st.meta.n_regions) == (4, 3)


def _pair_listing_every_cell(mask_atac: np.ndarray):
    rna, atac = _pair(n=len(mask_atac))
    atac.X = sp.csr_matrix(atac.X.toarray() * mask_atac[:, None])  # the unmeasured cells' rows are empty
    for a in (rna, atac):
        a.obs["mask_rna"], a.obs["mask_atac"] = True, mask_atac
    return rna, atac


@pytest.mark.parametrize("in_which", ["rna", "atac", "both"])
def test_mask_columns_in_the_pair_files_obs_are_honoured(tmp_path, in_which):
    # both files list every cell (a store shard written back as two .h5ad): membership alone made the last two
    # cells "ATAC measured, all zero", and the files' own mask_atac was overwritten without a word
    mask = np.array([True] * 4 + [False] * 2)
    rna, atac = _pair_listing_every_cell(mask)
    for name, a in (("rna", rna), ("atac", atac)):
        if in_which not in (name, "both"):
            del a.obs["mask_atac"], a.obs["mask_rna"]
    st = _build(tmp_path, [_write_pair(tmp_path, rna, atac)])
    obs = st.read_obs()
    np.testing.assert_array_equal(obs["mask_atac"].to_numpy(), mask)
    assert obs["mask_rna"].all() and st.meta.n_cells_atac == 4
    np.testing.assert_array_equal(st.read_rows("atac", 0, 0, 4).toarray(), atac.X[:4].toarray())


def test_a_mask_column_cannot_add_a_cell_that_is_not_in_the_file(tmp_path):
    # membership still decides first: a cell missing from the ATAC file stays unmeasured whatever a column says
    rna, atac = _pair()
    rna.obs["mask_atac"] = True
    st = _build(tmp_path, [_write_pair(tmp_path, rna, atac[:3].copy())])
    np.testing.assert_array_equal(st.read_obs()["mask_atac"].to_numpy(), [True] * 3 + [False] * 3)


def test_a_mask_column_of_text_that_is_no_bool_is_refused_naming_the_file(tmp_path):
    rna, atac = _pair()
    rna.obs["mask_atac"] = ["measured"] * 6
    with pytest.raises(ValueError, match=r"rna.h5ad obs: obs\['mask_atac'\] of cell 'c0' is 'measured'"):
        _build(tmp_path, [_write_pair(tmp_path, rna, atac)])


def test_a_batch_key_naming_a_column_of_the_store_is_refused_in_one_line(tmp_path):
    # batch_key=cell_index: the store's own column replaced the batch column, then an AttributeError
    # traceback from the first shard's statistics
    rna, atac = _pair()
    rna.obs["cell_index"] = ["a", "b"] * 3
    with pytest.raises(ValidationError, match=r"batch_key 'cell_index' names one of the store's own obs columns"):
        _build(tmp_path, [_write_pair(tmp_path, rna, atac)], batch_key="cell_index")
    assert not (tmp_path / "s.zarr").exists()


def test_a_10x_h5_without_feature_types_is_refused_naming_the_file(tmp_path):
    rna, atac = _pair()
    path = tmp_path / "m.h5"
    _write_tenx_h5(path, rna, atac)
    with h5py.File(path, "a") as f:
        del f["matrix/features/feature_type"]
    with pytest.raises(ValueError, match=r"m.h5: not a Cell Ranger 3\+ / ARC feature-barcode matrix: matrix/ "
                                         r"lacks features/feature_type"):
        _build(tmp_path, [InputConfig(kind="tenx_h5", path=str(path))], batch_key=None)
    with h5py.File(path, "a") as f:  # the refusal closed the file: it can be written again at once
        f.attrs["x"] = 1


@pytest.mark.parametrize("dense", [True, False])
def test_float16_counts_are_read_exactly(tmp_path, dense):
    # scipy.sparse has no float16: "scipy.sparse does not support dtype float16", naming no file
    rna, atac = _pair()
    want = rna.X.toarray()
    rna.X = want.astype(np.float16) if dense else sp.csr_matrix(want.astype(np.float32))
    inp = _write_pair(tmp_path, rna, atac)
    if not dense:  # scipy cannot build a float16 CSR; other writers (h5py, R) can
        with h5py.File(inp.rna, "a") as f:
            data = f["X/data"][:]
            del f["X/data"]
            f["X/data"] = data.astype(np.float16)
    st = _build(tmp_path, [inp])
    np.testing.assert_array_equal(st.read_rows("rna", 0, 0, 6).toarray(), want)


def test_float16_non_integer_counts_are_still_refused(tmp_path):
    rna, atac = _pair()
    rna.X = (rna.X.toarray() / 2).astype(np.float16)
    with pytest.raises(ValidationError, match="is not an integer"):
        _build(tmp_path, [_write_pair(tmp_path, rna, atac)])


@pytest.mark.parametrize(("dtype", "values"), [(np.int16, (30000, 30000)), (np.uint8, (200, 100))])
def test_duplicate_entries_are_summed_without_wrapping(tmp_path, dtype, values):
    # two entries of one (cell, gene), each a valid count, summed in the file's own type: 30,000 + 30,000 in
    # int16 wrapped to -5,536 and was stored as 96
    x = sp.csr_matrix((np.array([*values, 3], dtype), np.array([1, 1, 0], np.int32), np.array([0, 2, 3])),
                      shape=(2, 3))
    obs = pd.DataFrame({"batch": ["b0", "b0"]}, index=["c0", "c1"])
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=["g0", "g1", "g2"])).write_h5ad(tmp_path / "r.h5ad")
    st = _build(tmp_path, [InputConfig(kind="h5ad_pair", rna=str(tmp_path / "r.h5ad"))])
    np.testing.assert_array_equal(st.read_rows("rna", 0, 0, 2).toarray(), [[0, sum(values), 0], [3, 0, 0]])
