"""What a model keeps of its training store (model.json ``training_store``) and why inference needs it:
per-cell modality weights are rows of a table over the training cells, and the ATAC size factors of a
size-factor model are scaled by the training store's largest ATAC total. Both used to be read from
whichever store inference was given.

    .venv/bin/python -m pytest tests/test_infer_training_store.py -q
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from data.build import build_store
from data.config import BuildConfig, InputConfig
from data.store import open_store
from tests.train_utils import tiny_config, tiny_store
from trainer.api import load
from trainer.infer import infer
from trainer.infer_config import AccessibilityOptions, InferConfig
from trainer.jobs.common import InferError
from trainer.scvi_io import store_to_mudata
from trainer.train import train


def _rebuild(store, out, keep=None, **kw):
    """The store's cells (``keep``: a boolean subset), in store order, as one scvi-layout AnnData (genes then
    peaks, masks in obs), built again by mva-build."""
    import pandas as pd
    import scipy.sparse as sp

    md = store_to_mudata(store)
    keep = np.ones(md.n_obs, bool) if keep is None else keep
    obs = md.obs.loc[keep, ["batch", "mask_rna", "mask_atac"]].copy()
    obs["batch"] = obs["batch"].astype(str)
    var = pd.DataFrame({"modality": ["Gene Expression"] * md["rna"].n_vars + ["Peaks"] * md["atac"].n_vars},
                       index=list(md["rna"].var_names) + list(md["atac"].var_names))
    x = sp.hstack([md["rna"].X[keep], md["atac"].X[keep]], format="csr")
    ad.AnnData(x, obs=obs, var=var).write_h5ad(out.parent / f"{out.name}.h5ad")
    return build_store(BuildConfig(out=str(out), progress=False, **kw,
                                   inputs=[InputConfig(kind="scvi", path=str(out.parent / f"{out.name}.h5ad"))]))


def _cfg(store, run, out, **kw):
    return InferConfig(model_dir=str(run), store=str(store), output=str(out), batch_size=128, progress=False, **kw)


def test_per_cell_weights_refuse_the_same_cells_in_another_order(tmp_path):
    """A rebuild of the training cells in another order (preshuffle) has the same cell count, which was all
    that was checked: every paired cell then read another cell's weights (the joint latent off by about its
    own spread, helper audit). A rebuild in the same order with another shard size is the same table."""
    store = tiny_store(tmp_path / "store", n_cells=300)
    run = train(tiny_config(store, tmp_path / "run", **{"model.modality_weights": "cell", "run.epochs": 1})).run_dir
    shuffled = _rebuild(store, tmp_path / "shuffled", preshuffle=True, seed=3)
    assert open_store(shuffled).meta.n_cells == open_store(store).meta.n_cells
    with pytest.raises(InferError, match="the same cells on the same rows.*other ones or in another order"):
        infer(_cfg(shuffled, run, tmp_path / "a.zarr"))
    same_order = _rebuild(store, tmp_path / "reshard", shard_size=64)
    infer(_cfg(same_order, run, tmp_path / "b.zarr"))
    infer(_cfg(store, run, tmp_path / "c.zarr"))
    a, b = ad.read_zarr(tmp_path / "b.zarr"), ad.read_zarr(tmp_path / "c.zarr")
    np.testing.assert_allclose(a.obsm["X_multivi"], b.obsm["X_multivi"], atol=1e-6)


def test_size_factor_models_scale_atac_by_the_training_store(tmp_path):
    """normalize_cells divides by the ATAC size factor, total / largest total: over the store inference was
    given, a store without the training's 5 largest cells moved every ATAC cell's values by 23 % (helper
    audit), and a single in-memory cell got factor 1."""
    store = tiny_store(tmp_path / "store", n_cells=300)
    run = train(tiny_config(store, tmp_path / "run", **{"model.use_size_factor": True, "run.epochs": 1})).run_dir
    md = store_to_mudata(store)
    totals = np.asarray(md["atac"].X.sum(axis=1)).ravel() * md.obs["mask_atac"].to_numpy(bool)
    keep = totals < np.sort(totals)[-5]
    sub = _rebuild(store, tmp_path / "sub", keep=keep)
    acc = AccessibilityOptions(normalize_cells=True)
    for s, name in ((store, "full"), (sub, "sub")):
        infer(_cfg(s, run, tmp_path / f"{name}.zarr", job="accessibility", accessibility=acc))
    full, part = ad.read_zarr(tmp_path / "full.zarr"), ad.read_zarr(tmp_path / "sub.zarr")
    atac_cells = part.obs_names[part.obs["mask_atac"].to_numpy(bool)]
    np.testing.assert_allclose(np.asarray(part[atac_cells].X), np.asarray(full[atac_cells].X), rtol=1e-5, atol=1e-7)
    # the notebook API on one in-memory cell (no size factor columns) gives that cell's row too
    model = load(run)
    cell = atac_cells[0]
    one = {"rna": md["rna"][[cell]].copy(), "atac": md["atac"][[cell]].copy()}
    for a in one.values():
        a.obs = md.obs.loc[[cell], ["batch", "mask_rna", "mask_atac"]]
    got = model.accessibility(one, normalize_cells=True)
    np.testing.assert_allclose(np.asarray(got).ravel(), np.asarray(full[[cell]].X).ravel(), rtol=1e-5, atol=1e-7)
    # store_to_mudata(sub) writes size factor columns over sub's own largest total: recomputed, not read
    np.testing.assert_allclose(model.accessibility(store_to_mudata(sub), normalize_cells=True),
                               model.accessibility(str(sub), normalize_cells=True), rtol=1e-5, atol=1e-7)


def test_the_training_store_survives_an_scvi_round_trip(tmp_path):
    """to_scvi then from_scvi dropped model.json's training_store: the imported model was back to the store's
    own ATAC scale and to the count check for per-cell weights (review)."""
    import json

    from trainer.export import INFO, TRAINING_STORE
    from trainer.scvi_import import import_from_scvi
    from trainer.scvi_io import export_to_scvi

    store = tiny_store(tmp_path / "store", n_cells=300)
    run = train(tiny_config(store, tmp_path / "run", **{"model.use_size_factor": True, "run.epochs": 1})).run_dir
    facts = json.loads((Path(run) / "model" / INFO).read_text())[TRAINING_STORE]
    assert set(facts) == {"cells_fingerprint", "atac_library_max"} and facts["atac_library_max"] > 1
    export_to_scvi(run, tmp_path / "scvi")
    back = import_from_scvi(tmp_path / "scvi", tmp_path / "back")
    assert json.loads((back / INFO).read_text())[TRAINING_STORE] == facts
