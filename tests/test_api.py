"""Notebook API (trainer/api.py) on a model trained by the real trainer on a real store with covariates.

    .venv/bin/python -m pytest tests/test_api.py -q

Store inputs must give the embed job's numbers and trainer.predict's (the expression / accessibility
jobs' math) on the same batches; in-memory AnnData / MuData / dict inputs, in another cell and feature
order, must give the store's numbers; the modality mask follows the documented rules and never turns an
all-zero row into "missing" silently; bad inputs fail with one clear message.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from data.stream import StoreStream
from tests.train_utils import tiny_config, tiny_store
from trainer import predict
from trainer.api import APIError, load
from trainer.infer import infer
from trainer.infer_config import InferConfig
from trainer.jobs.common import InferError
from trainer.scvi_io import store_to_mudata
from trainer.train import train

N_CELLS, BATCH = 260, 64
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from data.synthetic import write_synthetic_store

    root = tmp_path_factory.mktemp("api")
    store = write_synthetic_store(root / "store", n_cells=N_CELLS, n_genes=100, n_regions=300, progress=False,
                                  with_covariates=True)
    res = train(tiny_config(store, root / "run"))
    return store, Path(res.run_dir), load(res.run_dir)


def _predict_on_store(model, store, fn, **kw) -> np.ndarray:
    """trainer.predict over the store's own batches (what the expression / accessibility jobs compute)."""
    stream = StoreStream(store, batch_size=BATCH, split="all", shuffle=False, prefetch=0)
    return np.concatenate([fn(model.module, stream.make_batch(np.arange(lo, min(lo + BATCH, N_CELLS))), **kw).numpy()
                           for lo in range(0, N_CELLS, BATCH)])


def test_store_input_equals_the_jobs(trained, tmp_path):
    store, run, model = trained
    out = tmp_path / "emb.zarr"
    infer(InferConfig(model_dir=str(run), store=str(store), output=str(out), batch_size=BATCH, progress=False))
    emb = ad.read_zarr(str(out))
    for modality, key in (("joint", "X_multivi"), ("expression", "X_multivi_expression"),
                          ("accessibility", "X_multivi_accessibility")):
        np.testing.assert_allclose(model.latent(store, modality=modality, batch_size=BATCH), emb.obsm[key],
                                   err_msg=modality, **TOL)

    # posterior samples: same (seed, chunk) seeding as the job, so equal draws with equal batch_size
    out2 = tmp_path / "samples.zarr"
    infer(InferConfig(model_dir=str(run), store=str(store), output=str(out2), batch_size=BATCH, progress=False,
                      give_mean=False, n_samples=2, seed=3, modalities=["joint"]))
    z = model.latent(store, give_mean=False, n_samples=2, seed=3, batch_size=BATCH)
    assert z.shape == (N_CELLS, 2, model.module.n_latent)
    np.testing.assert_allclose(z, ad.read_zarr(str(out2)).obsm["X_multivi"], **TOL)

    genes = ["gene_00007", "gene_00002", "gene_00050"]
    got = model.expression(store, transform_batch=["batch_0", "batch_1"], library_size="observed", genes=genes,
                           batch_size=BATCH)
    want = _predict_on_store(model, store, predict.normalized_expression, transform_batch=[0, 1],
                             library_size="observed", gene_index=[7, 2, 50])
    np.testing.assert_allclose(got, want, **TOL)
    regions = model.region_names[10:20]
    got = model.accessibility(store, normalize_cells=True, normalize_regions=True, regions=regions,
                              transform_batch="batch_1", batch_size=BATCH)
    want = _predict_on_store(model, store, predict.normalized_accessibility, transform_batch=[1],
                             normalize_cells=True, normalize_regions=True, region_index=list(range(10, 20)))
    np.testing.assert_allclose(got, want, **TOL)
    sparse = model.accessibility(store, threshold=0.3, batch_size=BATCH)
    dense = model.accessibility(store, batch_size=BATCH)
    assert sp.issparse(sparse) and 0 < sparse.nnz < dense.size
    np.testing.assert_array_equal(sparse.toarray(), np.where(dense >= 0.3, dense, 0))


def test_in_memory_layouts_equal_the_store(trained):
    store, _, model = trained
    z_store = model.latent(store)
    e_store = model.expression(store, transform_batch="batch_0")
    rng = np.random.default_rng(0)
    cells = rng.permutation(N_CELLS)[:200]  # another cell order, a subset

    mdata = store_to_mudata(store, cells)
    perm = rng.permutation(mdata["rna"].n_vars)  # another gene order: mapped back by name
    mdata.mod["rna"] = mdata["rna"][:, perm].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # mask columns present: nothing inferred, no warning
        np.testing.assert_allclose(model.latent(mdata, batch_size=BATCH), z_store[cells], **TOL)
    np.testing.assert_allclose(model.expression(mdata, transform_batch="batch_0"), e_store[cells], **TOL)

    # genes-then-peaks AnnData, mask from a 'modality' column; covariates as plain strings
    obs = mdata.obs.copy()
    both, rna_only = obs["mask_rna"] & obs["mask_atac"], obs["mask_rna"] & ~obs["mask_atac"]
    obs["modality"] = np.where(both, "paired", np.where(rna_only, "expression", "accessibility"))
    obs = obs.drop(columns=["mask_rna", "mask_atac"]).astype({"site": str, "batch": str})
    full = store_to_mudata(store, cells)
    x = sp.hstack([full["rna"].X, full["atac"].X]).tocsr()
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=model.gene_names + model.region_names))
    res = model.latent(adata, as_anndata=True)
    assert list(res.obs_names) == list(adata.obs_names)
    np.testing.assert_allclose(res.obsm["X_multivi"], z_store[cells], **TOL)

    # separate AnnData per modality holding only the cells measured there: membership is the mask
    parts = {}
    for mod in ("rna", "atac"):
        keep = full.obs[f"mask_{mod}"].to_numpy()
        a = full[mod][keep].copy()
        a.obs = full.obs.loc[keep, ["batch", "site", "pct_mito"]]
        parts[mod] = a
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = model.latent(parts, as_anndata=True)
    order = res.obs_names.get_indexer(full.obs_names)
    np.testing.assert_allclose(res.obsm["X_multivi"][order], z_store[cells], **TOL)
    expr = model.expression(parts, genes=["gene_00001"], as_anndata=True)
    assert list(expr.var_names) == ["gene_00001"] and expr.n_obs == len(cells)


def test_mask_is_never_inferred_silently(trained):
    store, _, model = trained
    z_store = model.latent(store)
    mdata = store_to_mudata(store)  # fully paired: missing modalities are all-zero rows
    masks = mdata.obs[["mask_rna", "mask_atac"]].to_numpy()
    mdata.obs = mdata.obs.drop(columns=["mask_rna", "mask_atac"])
    n_zero = int((~masks[:, 0]).sum())
    with pytest.warns(UserWarning, match=f"{n_zero} cells with an all-zero RNA row .* treated as MEASURED"):
        z_all = model.latent(mdata)
    lacking = ~masks.all(axis=1)
    # counted as measured, the zero rows change those cells' joint latent (and only theirs)
    assert np.abs(z_all[lacking] - z_store[lacking]).max() > 1e-3
    np.testing.assert_allclose(z_all[~lacking], z_store[~lacking], **TOL)
    # the explicit mask= (rule 1) restores the store's numbers, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        np.testing.assert_allclose(model.latent(mdata, mask=masks), z_store, **TOL)


def test_bad_inputs_fail_clearly(trained, tmp_path):
    store, _, model = trained
    mdata = store_to_mudata(store, np.arange(40))
    with pytest.raises(APIError, match="features differ.*1 missing"):
        model.latent(md.MuData({"rna": mdata["rna"][:, 1:].copy(), "atac": mdata["atac"]}))
    bad = store_to_mudata(store, np.arange(40))
    bad.obs["batch"] = bad.obs["batch"].astype(str).replace({"batch_1": "batch_9"})
    with pytest.raises(APIError, match=r"labels the model was not trained on: \['batch_9'\]"):
        model.latent(bad)
    nobatch = store_to_mudata(store, np.arange(40))
    nobatch.obs = nobatch.obs.drop(columns=["batch"])
    with pytest.raises(APIError, match="no column 'batch'"):
        model.latent(nobatch)
    with pytest.raises(APIError, match="unknown batch label"):
        model.expression(mdata, transform_batch="batch_7")
    with pytest.raises(APIError, match="modality must be"):
        model.latent(mdata, modality="protein")
    with pytest.raises(APIError, match="mask must be a boolean array of shape"):
        model.latent(mdata, mask=np.ones((3, 2), bool))
    with pytest.raises(APIError, match="unknown.*gene_xyz"):
        model.expression(mdata, genes=["gene_xyz"])
    with pytest.raises(APIError, match="give_mean=False"):
        model.latent(mdata, n_samples=3)
    with pytest.raises(APIError, match="data must be"):
        model.latent(np.zeros((3, 3)))
    other = tiny_store(tmp_path / "other", n_cells=30)  # no covariates: not the model's store
    with pytest.raises(InferError, match="covariates"):
        model.latent(other)


def test_size_factor_models_get_the_loaders_size_factors_from_every_input(trained, tmp_path):
    """use_size_factor: the ATAC factor is the cell's total over the largest total (in (0, 1]); the
    in-memory API and the MuData for scvi-tools used the raw total, so normalize_cells outputs were
    ~35x the store's and the reference's."""
    from data import keys
    from trainer.scvi_io import SIZE_FACTOR_COLUMNS

    store, _, _ = trained
    res = train(tiny_config(store, tmp_path / "sf", **{"model.use_size_factor": True, "run.epochs": 1}))
    model = load(res.run_dir)
    stream = StoreStream(store, batch_size=N_CELLS, split="all", shuffle=False, prefetch=0, size_factor=True)
    loader_sf = stream.make_batch(np.arange(N_CELLS))[keys.SIZE_FACTOR].numpy()
    mdata = store_to_mudata(store)
    for j, col in enumerate(SIZE_FACTOR_COLUMNS):
        np.testing.assert_allclose(mdata.obs[col].to_numpy(), loader_sf[:, j], rtol=1e-6)
    assert 0 < loader_sf[:, 1].min() and loader_sf[:, 1].max() == 1.0
    np.testing.assert_allclose(model.accessibility(mdata, normalize_cells=True, batch_size=BATCH),
                               model.accessibility(store, normalize_cells=True), **TOL)


def test_duplicate_csr_entries_mean_their_sum(trained):
    """scipy reads a repeated (row, col) as the sum; the in-memory path passed the entries on, and the
    C densifier of the RNA block kept only the last one (latents ~1e-2 off)."""
    store, _, model = trained
    mdata = store_to_mudata(store)
    z = model.latent(mdata, batch_size=BATCH)
    x = mdata["rna"].X.tocoo()
    big = x.data >= 2  # split every count c >= 2 into (c - 1) + 1: same matrix, duplicate entries
    rows = np.concatenate([x.row, x.row[big]])
    order = np.argsort(rows, kind="stable")
    data = np.concatenate([x.data - big, np.ones(big.sum(), x.data.dtype)])[order]
    cols = np.concatenate([x.col, x.col[big]])[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=x.shape[0]))])
    dup = sp.csr_matrix((data, cols, indptr), shape=x.shape)  # (data, indices, indptr): kept as given
    assert dup.nnz > mdata["rna"].X.nnz and abs(dup - mdata["rna"].X).max() == 0
    mdata.mod["rna"].X = dup
    np.testing.assert_allclose(model.latent(mdata, batch_size=BATCH), z, **TOL)


def test_numpy_integers_as_transform_batch(trained):
    store, _, model = trained
    ref = model.expression(store, transform_batch="batch_1")
    for tb in (np.int64(1), [np.int64(1)], np.array([1])):
        np.testing.assert_allclose(model.expression(store, transform_batch=tb), ref, **TOL)


def test_obs_mask_columns_follow_the_builders_rules(trained):
    """NaN in an object mask column was read as True (measured), one mask column alone was ignored."""
    store, _, model = trained
    mdata = store_to_mudata(store)
    z = model.latent(mdata, batch_size=BATCH)
    as_text = mdata.copy()
    as_text.obs["mask_rna"] = as_text.obs["mask_rna"].map({True: "True", False: "False"})
    np.testing.assert_allclose(model.latent(as_text, batch_size=BATCH), z, **TOL)
    nan = mdata.copy()
    nan.obs["mask_atac"] = nan.obs["mask_atac"].astype(object)
    nan.obs.iloc[3, nan.obs.columns.get_loc("mask_atac")] = np.nan
    with pytest.raises(APIError, match=r"mask_atac.*expected True/False"):
        model.latent(nan)
    one = mdata.copy()
    one.obs = one.obs.drop(columns="mask_atac")
    with pytest.raises(APIError, match="'mask_rna' but not its partner"):
        model.latent(one)


def test_a_subset_with_store_size_factor_columns_gets_the_stores_numbers(trained, tmp_path):
    """The ATAC size factor divides by the largest total: of the whole store for store input, of the
    given cells for in-memory input -- unless the data carries the factors (store_to_mudata's columns)."""
    from trainer.scvi_io import SIZE_FACTOR_COLUMNS

    store, _, _ = trained
    res = train(tiny_config(store, tmp_path / "sf", **{"model.use_size_factor": True, "run.epochs": 1}))
    model = load(res.run_dir)
    cells = np.arange(0, N_CELLS, 7)
    whole = model.accessibility(store, normalize_cells=True)[cells]
    sub = store_to_mudata(store, cells)
    assert all(c in sub.obs for c in SIZE_FACTOR_COLUMNS)
    np.testing.assert_allclose(model.accessibility(sub, normalize_cells=True, batch_size=BATCH), whole, **TOL)


def test_in_memory_inputs_without_x_or_with_repeated_ids_fail_in_one_line(trained):
    store, _, model = trained
    mdata = store_to_mudata(store)
    rna = mdata["rna"].copy()
    rna.layers["counts"] = rna.X
    rna.X = None
    with pytest.raises(APIError, match=r"has no X \(counts in a layer\? \['counts'\]\)"):
        model.latent({"rna": rna})
    dup = mdata["rna"].copy()
    dup.obs_names = ["c0"] * dup.n_obs
    with pytest.raises(APIError, match="obs_names\\) are not unique"):
        model.latent({"rna": dup})


def test_a_per_cell_weights_model_takes_only_its_store(trained, tmp_path):
    """Per-cell modality weights are indexed by training cell: in-memory cells would silently read the first
    n training cells' weights, so only the training store is accepted (the reference refuses any data)."""
    store, _, _ = trained
    res = train(tiny_config(store, tmp_path / "run", **{"model.modality_weights": "cell", "run.epochs": 1}))
    model = load(res.run_dir)
    assert model.latent(str(store)).shape[0] == N_CELLS
    with pytest.raises(APIError, match="per-cell modality weights"):
        model.latent(store_to_mudata(store))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_library_size_and_region_factors_equal_the_references(trained):
    """Model.library_size_factors / region_factors: scvi-tools' get_library_size_factors / get_region_factors
    with the same weights on the same cells."""
    from tests.infer_utils import reference_model

    store, run, model = trained
    ref, mdata = reference_model(store, run / "model")
    lib = model.library_size_factors(store, batch_size=BATCH)
    want = ref.get_library_size_factors()
    assert set(lib) == {"expression", "accessibility"} and lib["expression"].shape == (N_CELLS,)
    assert mdata.n_obs == N_CELLS  # the reference's cells are the store's, in store order
    for k in ("expression", "accessibility"):
        np.testing.assert_allclose(lib[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert ((lib["accessibility"] > 0) & (lib["accessibility"] < 1)).all()
    np.testing.assert_allclose(model.region_factors(), ref.get_region_factors(), rtol=1e-6, atol=1e-7)

    saved, model.module.region_factors = model.module.region_factors, None
    try:
        with pytest.raises(APIError, match="region_factors=false"):
            model.region_factors()
    finally:
        model.module.region_factors = saved


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_elbo_and_reconstruction_error_are_the_references_numbers(trained):
    """Model.elbo / reconstruction_error: scvi-tools' get_elbo / get_reconstruction_error (same sign and terms).
    The reference draws each cell's posterior sample from the global RNG, ours keyed by the cell: equal up to
    that noise, and ours is the same for any batching and input form."""
    from tests.infer_utils import reference_model

    store, run, model = trained
    ref, mdata = reference_model(store, run / "model")
    e, r = model.elbo(store, batch_size=BATCH), model.reconstruction_error(store, batch_size=BATCH)
    assert e < 0 and set(r) == {"reconstruction_loss_expression", "reconstruction_loss_accessibility"}
    assert model.elbo(store, batch_size=37) == pytest.approx(e, rel=1e-6)
    assert model.elbo(mdata, batch_size=BATCH) == pytest.approx(e, rel=1e-6)  # in memory: the same rows
    assert model.elbo(store, batch_size=BATCH, seed=1) != e
    torch.manual_seed(0)
    ref_e, ref_r = float(ref.get_elbo()), ref.get_reconstruction_error()
    assert e == pytest.approx(ref_e, rel=0.01)
    for k, v in r.items():
        assert v == pytest.approx(float(ref_r[k]), rel=0.01), k
    assert float(ref_r["reconstruction_loss_protein"]) == 0.0


def test_continuous_covariates_follow_the_store_builders_rule(trained):
    """inf in a continuous covariate was accepted and gave that cell NaN expression and accessibility without a
    word; a text value a bare pandas ValueError. Refused as mva-build refuses them (data.validate.check_cont)."""
    store, _, model = trained
    mdata = store_to_mudata(store, np.arange(10))
    for value, why in ((np.inf, r"continuous covariate 'pct_mito' is inf for cell"),
                       (1e39, r"'pct_mito' is 1e\+39 .*beyond float32"), ("abc", r"'pct_mito' is not numeric")):
        bad = mdata.copy()
        bad.obs["pct_mito"] = bad.obs["pct_mito"].astype(object)
        bad.obs.loc[bad.obs_names[1], "pct_mito"] = value
        with pytest.raises(APIError, match=why):
            model.expression(bad)
    assert np.isfinite(model.expression(mdata)).all()
