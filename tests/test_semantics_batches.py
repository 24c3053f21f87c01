"""transform_batch names the MODEL's batches in every inference path, also on a store that holds only some
of them (built from part of the data: its own batch list is shorter and numbered from 0).

    .venv/bin/python -m pytest tests/test_semantics_batches.py -q
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
from tests.infer_utils import infer_cfg, trained_model
from trainer.infer import infer
from trainer.infer_config import AccessibilityOptions, ExpressionOptions
from trainer.scvi_io import store_to_mudata

TOL = {"rtol": 1e-5, "atol": 1e-7}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(full store, batch_1-only store built by mva-build, run directory)."""
    store, run = trained_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("part")
    mdata = store_to_mudata(store)
    keep = (mdata.obs["batch"].astype(str) == "batch_1").to_numpy()
    obs = mdata.obs.loc[keep, ["batch", "mask_rna", "mask_atac"]].copy()
    obs["batch"] = obs["batch"].astype(str)
    x = sp.hstack([mdata["rna"].X[keep], mdata["atac"].X[keep]], format="csr")
    var = pd.DataFrame(
        {"modality": ["Gene Expression"] * mdata["rna"].n_vars + ["Peaks"] * mdata["atac"].n_vars},
        index=list(mdata["rna"].var_names) + list(mdata["atac"].var_names),
    )
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(root / "part.h5ad")
    part = build_store(
        BuildConfig(
            out=str(root / "part.zarr"),
            progress=False,
            inputs=[InputConfig(kind="scvi", path=str(root / "part.h5ad"))],
        )
    )
    assert open_store(part).meta.batch_categories == ["batch_1"]  # code 0 here, code 1 in the model
    return store, part, run


@pytest.mark.parametrize("job", ["expression", "accessibility"])
def test_transform_batch_on_a_store_of_some_batches_is_the_models_batch(stores, tmp_path, job):
    """Was: the label was looked up in the store's list, so 'batch_1' became code 0 = the model's batch_0
    (a silently wrong decode, with uns saying batch_1), and the model's 'batch_0' was refused as unknown."""
    store, part, run = stores
    opts = ExpressionOptions if job == "expression" else AccessibilityOptions
    for tb in ("batch_1", "batch_0", ["batch_0", "batch_1"]):
        name = "_".join([tb] if isinstance(tb, str) else tb)
        full_out, part_out = tmp_path / f"full_{name}.zarr", tmp_path / f"part_{name}.zarr"
        infer(infer_cfg(store, run, full_out, job=job, **{job: opts(transform_batch=tb)}))
        infer(infer_cfg(part, run, part_out, job=job, **{job: opts(transform_batch=tb)}))
        full, got = ad.read_zarr(str(full_out)), ad.read_zarr(str(part_out))
        np.testing.assert_allclose(got.X, full[got.obs_names].X, err_msg=str(tb), **TOL)
        assert list(got.uns["multivi"]["transform_batch"]) == ([tb] if isinstance(tb, str) else tb)
