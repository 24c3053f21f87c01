"""Each bad input gets a clear error (file, field, example row) and leaves no output behind.

Run: .venv/bin/python -m pytest tests/test_validate.py -q
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data.build import build_store
from data.config import BuildConfig, InputConfig
from data.store import open_store
from data.validate import ValidationError

DATA = Path("/work/shared/data/neurips2021_bmmc_multiome_starter")


@pytest.fixture(scope="module")
def pair():
    return ad.read_h5ad(DATA / "bmmc_starter_rna.h5ad")[:60].copy(), ad.read_h5ad(DATA / "bmmc_starter_atac.h5ad")[:60].copy()


def _build(tmp_path, rna, atac, **kw):
    paths = {}
    for name, a in (("rna", rna), ("atac", atac)):
        if a is not None:
            a.write_h5ad(tmp_path / f"{name}.h5ad")
            paths[name] = str(tmp_path / f"{name}.h5ad")
    cfg = BuildConfig(out=str(tmp_path / "out" / "s.zarr"), progress=False, block_size=16, shard_size=32,
                      inputs=kw.pop("inputs", [InputConfig(kind="h5ad_pair", **paths)]), **kw)
    return build_store(cfg)


def _no_output(tmp_path):
    out = tmp_path / "out"
    return not out.exists() or list(out.iterdir()) == []


def _with_value(a: ad.AnnData, row: int, col: int, value, dtype=np.float32) -> ad.AnnData:
    X = a.X.astype(dtype).tolil()
    X[row, col] = value
    b = a.copy()
    b.X = sp.csr_matrix(X)
    return b


@pytest.mark.parametrize("value,dtype,what", [(-3, np.int32, "is negative"), (2.5, np.float32, "is not an integer"),
                                              (np.nan, np.float32, "NaN or infinite"),
                                              (np.inf, np.float64, "NaN or infinite")])
def test_bad_counts_name_file_cell_and_feature(tmp_path, pair, value, dtype, what):
    rna, atac = pair
    bad = _with_value(rna, 37, 5, value, dtype)
    with pytest.raises(ValidationError) as e:
        _build(tmp_path, bad, atac)
    msg = str(e.value)
    assert "rna.h5ad" in msg and what in msg
    assert repr(rna.obs_names[37]) in msg and repr(rna.var_names[5]) in msg
    assert _no_output(tmp_path)


def test_duplicate_cell_ids_and_feature_names(tmp_path, pair):
    rna, atac = pair
    r = rna.copy()
    r.obs_names = list(r.obs_names[:-1]) + [r.obs_names[0]]
    with pytest.raises(ValueError, match=f"rna.h5ad.*duplicate cell id '{rna.obs_names[0]}'"):
        _build(tmp_path, r, atac)
    r = rna.copy()
    r.var_names = list(r.var_names[:-1]) + [r.var_names[3]]
    with pytest.raises(ValidationError, match=f"rna.h5ad.*duplicate rna feature name '{rna.var_names[3]}'"):
        _build(tmp_path, r, atac)
    assert _no_output(tmp_path)


def test_duplicate_cell_ids_across_inputs(tmp_path, pair):
    rna, _atac = pair
    rna.write_h5ad(tmp_path / "a.h5ad")
    rna.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(ValidationError, match="appears more than once across inputs"):
        _build(tmp_path, None, None, inputs=[InputConfig(kind="h5ad_pair", rna=str(tmp_path / "a.h5ad")),
                                             InputConfig(kind="h5ad_pair", rna=str(tmp_path / "b.h5ad"))])


def test_missing_batch_and_covariate_columns(tmp_path, pair):
    rna, atac = pair
    with pytest.raises(ValidationError, match="rna.h5ad \\+ .*atac.h5ad: obs has no column 'donor' \\(batch_key\\)"):
        _build(tmp_path, rna, atac, batch_key="donor")
    with pytest.raises(ValidationError, match="obs has no column 'site' \\(cat_cov_keys\\)"):
        _build(tmp_path, rna, atac, cat_cov_keys=["site"])
    r = rna.copy()
    r.obs["age"] = 30.0
    r.obs.loc[r.obs_names[7], "age"] = np.nan
    with pytest.raises(ValidationError, match=f"'age'.*missing for cell '{rna.obs_names[7]}'"):
        _build(tmp_path, r, atac, cont_cov_keys=["age"])
    assert _no_output(tmp_path)


def test_cell_without_any_modality_errors_or_is_dropped(tmp_path, pair):
    rna, atac = pair
    X = sp.hstack([rna.X, atac.X], format="csr")
    obs = pd.DataFrame({"batch": "b1", "mask_rna": True, "mask_atac": True}, index=rna.obs_names)
    obs.iloc[[4, 9], [1, 2]] = False
    X = X.tolil()
    X[[4, 9], :] = 0
    var = pd.DataFrame({"modality": ["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars},
                       index=list(rna.var_names) + list(atac.var_names))
    ad.AnnData(sp.csr_matrix(X), obs=obs, var=var).write_h5ad(tmp_path / "scvi.h5ad")
    ins = [InputConfig(kind="scvi", path=str(tmp_path / "scvi.h5ad"))]
    with pytest.raises(ValidationError, match=f"cell '{rna.obs_names[4]}' has neither RNA nor ATAC .2 such"):
        _build(tmp_path, None, None, inputs=ins)
    assert _no_output(tmp_path)
    out = _build(tmp_path, None, None, inputs=ins, drop_empty_cells=True)
    from data.store import open_store

    st = open_store(out)
    assert st.meta.n_cells == 58 and rna.obs_names[4] not in st.read_obs().index
    assert st.meta.source["dropped_cells"] == {str(tmp_path / "scvi.h5ad"): 2}


def test_empty_input(tmp_path, pair):
    rna, _atac = pair
    with pytest.raises(ValidationError, match="rna.h5ad.*no cells"):
        _build(tmp_path, rna[:0].copy(), None)
    with pytest.raises(ValidationError, match="no inputs"):
        _build(tmp_path, None, None, inputs=[])
    assert _no_output(tmp_path)


def test_feature_sets_without_overlap(tmp_path, pair):
    rna, _atac = pair
    rna.write_h5ad(tmp_path / "a.h5ad")
    other = rna.copy()
    other.obs_names = [f"x{i}" for i in range(other.n_obs)]
    other.var_names = [f"ENSG{i:05d}" for i in range(other.n_vars)]
    other.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(ValidationError, match="rna feature names of the inputs do not overlap"):
        _build(tmp_path, None, None, inputs=[InputConfig(kind="h5ad_pair", rna=str(tmp_path / "a.h5ad")),
                                             InputConfig(kind="h5ad_pair", rna=str(tmp_path / "b.h5ad"))])
    assert _no_output(tmp_path)


def test_existing_output_refused_unless_overwrite(tmp_path, pair):
    rna, atac = pair
    out = _build(tmp_path, rna, atac)
    (out / "marker").write_text("x")
    with pytest.raises(ValidationError, match="already exists; set overwrite=true"):
        _build(tmp_path, rna, atac)
    assert (out / "marker").exists()
    _build(tmp_path, rna, atac, overwrite=True)
    assert not (out / "marker").exists()


def test_error_mid_stream_leaves_no_output(tmp_path, pair):
    """A bad value in the last block, after shards were already written: no store, no tmp dir."""
    rna, atac = pair
    bad = _with_value(atac, 59, 0, -1, np.int32)
    with pytest.raises(ValidationError, match="atac.h5ad"):
        _build(tmp_path, rna, bad)
    assert _no_output(tmp_path)


def test_scvi_layout_without_its_modality_column_names_the_option(tmp_path, pair):
    # scanpy's read_10x_h5 names the column feature_types; the error said only "no var modality column; set
    # n_genes", not which column was looked for nor that modality_key picks another one
    rna, atac = pair
    var = pd.DataFrame({"feature_types": ["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars},
                       index=list(rna.var_names) + list(atac.var_names))
    ad.AnnData(sp.hstack([rna.X, atac.X], format="csr"), obs=rna.obs[["batch"]], var=var).write_h5ad(tmp_path / "x.h5ad")
    inp = {"kind": "scvi", "path": str(tmp_path / "x.h5ad")}
    with pytest.raises(ValueError, match=r"no column 'modality' \(modality_key\).*e\.g\. 'feature_types'"):
        _build(tmp_path, None, None, inputs=[InputConfig(**inp)])
    assert _no_output(tmp_path)
    out = _build(tmp_path, None, None, inputs=[InputConfig(**inp, modality_key="feature_types")])
    assert (open_store(out).meta.n_genes, open_store(out).meta.n_regions) == (rna.n_vars, atac.n_vars)


@pytest.mark.parametrize("preshuffle", [False, True])
def test_counts_in_a_modality_the_mask_says_was_not_measured_name_the_file(tmp_path, pair, preshuffle):
    # the error came from the writer's invariant check: without the input's name (a plain ValueError with
    # preshuffle, and only after every cell had been spilled to disk)
    rna, atac = pair
    var = pd.DataFrame({"modality": ["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars},
                       index=list(rna.var_names) + list(atac.var_names))
    obs = rna.obs[["batch"]].copy()
    obs["modality"] = ["paired"] * 50 + ["expression"] * 10  # but their peak counts were kept
    path = tmp_path / "x.h5ad"
    ad.AnnData(sp.hstack([rna.X, atac.X], format="csr"), obs=obs, var=var).write_h5ad(path)
    with pytest.raises(ValidationError, match=rf"{path}: cell '{rna.obs_names[50]}' has atac counts but its mask"):
        _build(tmp_path, None, None, inputs=[InputConfig(kind="scvi", path=str(path))], preshuffle=preshuffle)
    assert _no_output(tmp_path)


def test_a_directory_input_is_not_called_missing(tmp_path, pair):
    # an AnnData .zarr directory given as rna= was reported as "input file ... does not exist"
    rna = pair[0]
    rna.write_zarr(tmp_path / "rna.zarr")
    with pytest.raises(ValueError, match=r"rna\.zarr is a directory; mva-build reads \.h5ad"):
        _build(tmp_path, None, None, inputs=[InputConfig(kind="h5ad_pair", rna=str(tmp_path / "rna.zarr"))])
    assert _no_output(tmp_path)


def test_a_file_that_is_no_anndata_names_itself(tmp_path, pair):
    # a non-HDF5 file gave h5py's "Unable to synchronously open file (file signature not found)" without its
    # name, and an HDF5 file without obs a KeyError traceback
    import h5py

    (tmp_path / "notes.h5ad").write_text("not hdf5")
    with h5py.File(tmp_path / "bare.h5", "w") as f:
        f.create_group("X")
    atac = str(tmp_path / "a.h5ad")
    pair[1].write_h5ad(atac)
    with pytest.raises(OSError, match=r"notes\.h5ad: cannot be read as HDF5"):
        _build(tmp_path, None, None, inputs=[InputConfig(rna=str(tmp_path / "notes.h5ad"), atac=atac)])
    with pytest.raises(ValueError, match=r"bare\.h5: not an AnnData: no obs / var"):
        _build(tmp_path, None, None, inputs=[InputConfig(rna=str(tmp_path / "bare.h5"), atac=atac)])
    for kind in ("h5mu", "tenx_h5"):
        with pytest.raises(OSError, match=r"notes\.h5ad: cannot be read as HDF5"):
            _build(tmp_path, None, None, inputs=[InputConfig(kind=kind, path=str(tmp_path / "notes.h5ad"))])
    assert _no_output(tmp_path)
