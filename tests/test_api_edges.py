"""Notebook API (trainer/api.py) edge cases found in review: arguments and layouts that gave silently wrong
numbers or refused valid input.

    .venv/bin/python -m pytest tests/test_api_edges.py -q
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mudata as md
import numpy as np
import pytest

from tests.infer_utils import N_CELLS, trained_model
from tests.train_utils import tiny_config
from trainer.api import APIError, load
from trainer.scvi_io import store_to_mudata
from trainer.train import train

BATCH = 64
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store, run = trained_model(tmp_path_factory)  # the session's shared model (tests/infer_utils.py)
    return store, load(run)


def test_library_size_follows_the_jobs_rule(trained):
    """np.float32(1e4) (e.g. a median of float32 totals) was refused as 'not a positive number', and
    library_size=inf returned a matrix of inf where the expression job refuses it."""
    store, model = trained
    want = model.expression(store, library_size=1e4, genes=["gene_00001", "gene_00002"])
    np.testing.assert_array_equal(model.expression(store, library_size=None), model.expression(store))  # rho
    for size in (np.float32(1e4), np.int64(10_000), np.array(1e4)):
        np.testing.assert_allclose(model.expression(store, library_size=size, genes=["gene_00001", "gene_00002"]),
                                   want, **TOL, err_msg=repr(size))
    for bad in (float("inf"), float("nan"), 0, -1.0, True, "1e4", "obs"):
        with pytest.raises(APIError, match="library_size must be a positive finite number or 'observed'"):
            model.expression(store, library_size=bad)


def test_a_mask_that_contradicts_the_mudata_modalities_is_refused(trained):
    """A cell the mask (obs columns here) calls ATAC-measured but absent from the MuData's 'atac' AnnData was
    taken as measured with an all-zero row: its joint latent moved by ~0.5, with no word."""
    store, model = trained
    full = store_to_mudata(store)
    keep = full.obs["mask_atac"].to_numpy().copy()
    dropped = np.flatnonzero(keep & full.obs["mask_rna"].to_numpy())[:20]
    keep[dropped] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = md.MuData({"rna": full["rna"].copy(), "atac": full["atac"][keep].copy()})
    mdata.obs = mdata.obs.join(full.obs)
    assert mdata.obs["mask_atac"].sum() == full.obs["mask_atac"].sum()
    first = full.obs_names[dropped[0]]
    with pytest.raises(APIError, match=rf"20 cells .*measured in atac .* not in the MuData 'atac' .*{first!r}"):
        model.latent(mdata)
    with pytest.raises(APIError, match="20 cells"):  # the same through mask=
        model.latent(mdata, mask=mdata.obs[["mask_rna", "mask_atac"]].to_numpy())
    # consistent: the mask agrees with membership -> the store's numbers
    ok = mdata.copy()
    ok.obs.loc[full.obs_names[dropped], "mask_atac"] = False
    z = model.latent(ok, batch_size=BATCH)
    order = ok.obs_names.get_indexer(full.obs_names)
    z_store = model.latent(store)
    others = np.setdiff1d(np.arange(N_CELLS), dropped)
    np.testing.assert_allclose(z[order][others], z_store[others], **TOL)


def test_a_backed_mudata_whose_modalities_order_cells_differently(trained, tmp_path):
    """A backed (h5py) dense X is read with the cells' row positions, which h5py takes only in increasing
    order: a backed .h5mu whose 'atac' AnnData lists the cells in another order ended in a TypeError."""
    store, model = trained
    z_store = model.latent(store)
    full = store_to_mudata(store)
    perm = np.random.default_rng(0).permutation(N_CELLS)
    rna, atac = full["rna"].copy(), full["atac"][perm].copy()
    rna.X, atac.X = rna.X.toarray(), atac.X.toarray()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = md.MuData({"rna": rna, "atac": atac})
    mdata.obs = mdata.obs.join(full.obs)
    mdata.write(tmp_path / "cells.h5mu")
    backed = md.read_h5mu(tmp_path / "cells.h5mu", backed=True)
    z = model.latent(backed, batch_size=BATCH)
    np.testing.assert_allclose(z[backed.obs_names.get_indexer(full.obs_names)], z_store, **TOL)


def test_modality_column_reads_as_the_store_builder_reads_it(trained):
    """mva-build reads obs['modality'] case-insensitively ('Paired', 'Expression', 'Accessibility'); the API
    refused those values, so the same AnnData that builds a store could not be passed in memory."""
    store, model = trained
    full = store_to_mudata(store)
    obs = full.obs.copy()
    both, rna_only = obs["mask_rna"] & obs["mask_atac"], obs["mask_rna"] & ~obs["mask_atac"]
    obs["modality"] = np.where(both, "Paired", np.where(rna_only, "Expression", "ACCESSIBILITY"))
    mdata = full.copy()
    mdata.obs = obs.drop(columns=["mask_rna", "mask_atac"])
    np.testing.assert_allclose(model.latent(mdata, batch_size=BATCH), model.latent(store), **TOL)
    mdata.obs["modality"] = mdata.obs["modality"].replace({"Paired": "both"})
    first = mdata.obs_names[(mdata.obs["modality"] == "both").to_numpy().argmax()]
    with pytest.raises(APIError, match=rf"obs\['modality'\] of cell {first!r} is 'both' \(\d+ such cells\)"):
        model.latent(mdata)


def test_size_factor_columns_with_missing_values_are_refused(trained, tmp_path):
    """store_to_mudata's size factor columns were used as given: NaN there (e.g. a MuData concatenated with
    cells from elsewhere, outer join) gave NaN accessibility rows with normalize_cells, without a word. A model
    that keeps its training store's ATAC scale (model.json training_store) recomputes them from the counts, so
    the columns cannot disagree with the store; one exported before (no training_store) still reads them."""
    import json
    import shutil

    from trainer.export import INFO, TRAINING_STORE
    from trainer.scvi_io import SIZE_FACTOR_COLUMNS

    store, _ = trained
    run = train(tiny_config(store, tmp_path / "sf", **{"model.use_size_factor": True, "run.epochs": 1})).run_dir
    mdata = store_to_mudata(store)
    col = mdata.obs.columns.get_loc(SIZE_FACTOR_COLUMNS[1])
    mdata.obs.iloc[3:8, col] = np.nan
    model = load(run)
    np.testing.assert_allclose(model.accessibility(mdata, normalize_cells=True),
                               model.accessibility(store, normalize_cells=True), **TOL)
    older = tmp_path / "older"
    shutil.copytree(Path(run) / "model", older)
    info = json.loads((older / INFO).read_text())
    del info[TRAINING_STORE]
    (older / INFO).write_text(json.dumps(info))
    with pytest.raises(APIError, match=rf"obs\['{SIZE_FACTOR_COLUMNS[1]}'\] \(size factors\) .* 5 cells"):
        load(older).accessibility(mdata, normalize_cells=True)


def test_a_cell_with_neither_modality_is_refused_naming_it(trained):
    """mask= (or mask_rna / mask_atac columns) with a cell measured in neither modality gave it a latent all
    the same (every such cell the same point: there is nothing to encode); mva-build refuses such cells too."""
    store, model = trained
    mdata = store_to_mudata(store)
    mask = mdata.obs[["mask_rna", "mask_atac"]].to_numpy().copy()
    mask[[3, 5, 7]] = False
    with pytest.raises(APIError, match=rf"3 cells are measured in neither modality .*{mdata.obs_names[3]!r}"):
        model.latent(mdata, mask=mask)
    model.latent(mdata[8:].copy(), mask=mask[8:])  # without them it runs


def test_load_picks_the_gpu_where_there_is_one_and_takes_a_device(tmp_path_factory, monkeypatch):
    """api.load used the CPU unless told otherwise, also on a GPU node (the reference's accelerator="auto" takes
    the GPU). "auto" is the default now: the GPU where one is visible (pretended here: the loader is only asked
    for the device), else the CPU; an explicit device is used as given."""
    import torch

    _, run = trained_model(tmp_path_factory)
    assert load(run).device == torch.device("cpu") and load(run, "cpu").device == torch.device("cpu")
    asked = []

    def record(model_dir, device):
        asked.append(device)
        raise LookupError("recorded")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("trainer.api.load_model", record)
    for device in ("auto", "cuda:1", "cpu"):
        with pytest.raises(LookupError):
            load(run, device)
    assert asked == ["cuda", "cuda:1", "cpu"]


@pytest.mark.parametrize("pull", [True, False])
def test_masks_in_the_modality_anndatas_of_a_dict_or_mudata_count(trained, pull):
    """mask_rna / mask_atac (or modality) in the obs of each modality's AnnData (a dict, or a MuData, whose obs
    then holds 'rna:mask_rna', ...) were ignored with a warning that no mask column exists, and every cell was
    taken as measured in both modalities: joint latents up to 0.92 off. ``pull``: whether mudata copies the
    modalities' obs columns into the MuData's obs (mudata < 0.4 does, 0.4 stops); read alike either way."""
    store, model = trained
    full = store_to_mudata(store)
    want = model.latent(store)
    masks = full.obs[["mask_rna", "mask_atac"]]
    rna, atac = full["rna"].copy(), full["atac"].copy()  # every cell in both (rows of zeros where unmeasured)
    for a in (rna, atac):
        a.obs["batch"] = full.obs.loc[a.obs_names, "batch"].to_numpy()
        a.obs[["mask_rna", "mask_atac"]] = masks.loc[a.obs_names].to_numpy()
    assert not masks.all(axis=None)
    with md.set_options(pull_on_update=pull), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "treated as measured" warning
        warnings.simplefilter("ignore", FutureWarning)
        np.testing.assert_allclose(model.latent({"rna": rna, "atac": atac}, batch_size=BATCH), want, **TOL)
        # the scvi-tools 'modality' column in one modality's obs only
        for a in (rna, atac):
            a.obs = a.obs.drop(columns=["mask_rna", "mask_atac"])
        mod = np.where(masks.all(axis=1), "paired", np.where(masks["mask_rna"], "expression", "accessibility"))
        rna.obs["modality"] = mod
        np.testing.assert_allclose(model.latent({"rna": rna, "atac": atac}, batch_size=BATCH), want, **TOL)
        # the two AnnDatas disagreeing about a cell: refused, naming it
        atac.obs["modality"] = mod
        atac.obs.iloc[3, atac.obs.columns.get_loc("modality")] = "paired" if mod[3] != "paired" else "expression"
        with pytest.raises(APIError, match=rf"'rna:modality' and 'atac:modality' disagree for cell "
                                           rf"{atac.obs_names[3]!r}"):
            model.latent({"rna": rna, "atac": atac})


def test_batch_labels_the_two_modalities_give_differently_are_refused(trained):
    """Batch and covariate columns are read from the modalities' obs as the masks are; a cell whose 'rna' and
    'atac' AnnData name other batches took the rna one without a word."""
    store, model = trained
    full = store_to_mudata(store)
    rna, atac = full["rna"].copy(), full["atac"].copy()
    for a in (rna, atac):
        a.obs["batch"] = full.obs.loc[a.obs_names, "batch"].astype(str).to_numpy()
    both = rna.obs_names.intersection(atac.obs_names)[0]
    other = next(b for b in model.info["batch_categories"] if b != atac.obs.loc[both, "batch"])
    atac.obs.loc[both, "batch"] = other
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(APIError, match=rf"'rna:batch' and 'atac:batch' disagree for cell {both!r}"):
            model.latent({"rna": rna, "atac": atac})


def test_bad_arguments_are_one_line_api_errors(trained, tmp_path_factory):
    """Each gave a deep error from elsewhere: batch_size=2.5 a TypeError from range(), a list of numbers an
    AttributeError inside mudata, device="gpu" torch's long device list, device="cuda" on a machine without
    one CUDA's initialisation error, normalize_regions without region factors a ValueError from predict."""
    store, model = trained
    mdata = store_to_mudata(store, np.arange(20))
    with pytest.raises(APIError, match=r"batch_size must be an integer >= 1, got 2\.5"):
        model.latent(mdata, batch_size=2.5)
    with pytest.raises(APIError, match=r"batch_size must be an integer >= 1, got True"):
        model.latent(mdata, batch_size=True)
    assert model.latent(mdata, batch_size=np.int64(7)).shape == (20, model.module.n_latent)
    with pytest.raises(APIError, match=r"holds AnnData \(or None\) per modality, got \{'rna': 'int', 'atac': 'int'\}"):
        model.latent([1, 2])
    _, run = trained_model(tmp_path_factory)
    with pytest.raises(APIError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'.*'gpu'"):
        load(run, device="gpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(APIError, match=r"device='cuda': no CUDA GPU is visible"):
            load(run, device="cuda")
    saved = model.module.region_factors
    try:
        model.module.region_factors = None
        with pytest.raises(APIError, match=r"normalize_regions=True needs a model trained with region_factors"):
            model.accessibility(mdata, normalize_regions=True)
    finally:
        model.module.region_factors = saved


def test_argument_types_are_checked_as_the_jobs_check_them(trained):
    """threshold=True was 1.0 (an all-zero matrix without a word; the job refuses a bool); n_samples=2.0,
    seed=2**50, threshold='0.5' and genes=5 were TypeError / overflow tracebacks from torch or numpy."""
    store, model = trained
    mdata = store_to_mudata(store, np.arange(20))
    for bad in (True, "0.5", 1.5):
        with pytest.raises(APIError, match=r"threshold must be a number in \[0, 1\] or None"):
            model.accessibility(mdata, threshold=bad)
    assert model.accessibility(mdata, threshold=np.float32(1e-9)).nnz == 20 * len(model.region_names)
    with pytest.raises(APIError, match=r"n_samples must be an integer >= 1, got 2\.0"):
        model.expression(mdata, give_mean=False, n_samples=2.0)
    assert model.latent(mdata, give_mean=False, n_samples=np.int64(2)).shape == (20, 2, model.module.n_latent)
    for bad in (2**50, -1, 1.0, True):
        with pytest.raises(APIError, match=r"seed must be an integer in \[0, 2\*\*44\)"):
            model.latent(mdata, give_mean=False, seed=bad)
    with pytest.raises(APIError, match=r"seed must be an integer"):
        model.elbo(mdata, seed=2**50)
    with pytest.raises(APIError, match=r"the genes must be a name or a list of names \(strings\), got 5"):
        model.expression(mdata, genes=5)
    with pytest.raises(APIError, match=r"the regions must be a name or a list of names"):
        model.accessibility(mdata, regions=[0, 1])
    names = model.gene_names[:3]
    np.testing.assert_array_equal(model.expression(mdata, genes=(g for g in names)),  # a generator: read once
                                  model.expression(mdata, genes=names))
