"""Notebook API (trainer/api.py) inputs a review (session 21) found read wrongly or refused unclearly: a MuData's
top-level modality column contradicting its modalities' own, a missing or unknown modality value, 0 cells for
the ELBO, a list of three AnnData, float16 counts, duplicate sparse entries in a narrow integer type.

    .venv/bin/python -m pytest tests/test_api_awkward.py -q
"""

# ruff: noqa: F811 - the imported fixture is every test's `trained` argument
from __future__ import annotations

import warnings

import anndata as ad
import mudata as md
import numpy as np
import pytest
import scipy.sparse as sp

# the fixture `trained` of the API edge tests (the session's shared model, loaded): pytest injects it by name
from tests.test_api_edges import TOL, trained  # noqa: F401
from trainer.api import APIError
from trainer.scvi_io import store_to_mudata


def _modality_mudata(store):
    """Every cell in both modalities (empty rows where unmeasured), the true 'modality' in each modality's obs."""
    full = store_to_mudata(store)
    o = full.obs
    mr, ma = o["mask_rna"].to_numpy(bool), o["mask_atac"].to_numpy(bool)
    mod = np.where(mr & ma, "paired", np.where(mr, "expression", "accessibility"))
    parts = {m: ad.AnnData(full[m].X, obs=o[["batch"]].assign(modality=mod), var=full[m].var) for m in ("rna", "atac")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return md.MuData(parts), mod


def test_a_top_level_modality_contradicting_the_modalities_own_is_refused(trained):
    # m.obs['modality'] = 'paired' over correct rna:/atac:modality columns: every single-modality cell was encoded
    # from its empty row as measured, latents up to 0.72 off, no word
    store, model = trained
    mdata, mod = _modality_mudata(store)
    want = model.latent(store)
    np.testing.assert_allclose(model.latent(mdata), want, **TOL)
    mdata.obs["modality"] = mod  # agreeing: read as before
    np.testing.assert_allclose(model.latent(mdata), want, **TOL)
    mdata.obs["modality"] = "paired"
    first = mdata.obs_names[np.flatnonzero(mod != "paired")[0]]
    with pytest.raises(APIError, match=rf"obs 'modality' and 'rna:modality' disagree for cell {first!r} "
                                       rf"\('paired' vs '{mod[mod != 'paired'][0]}'\)"):
        model.latent(mdata)


def test_top_level_masks_contradicting_the_modalities_masks_are_refused(trained):
    store, model = trained
    mdata, mod = _modality_mudata(store)
    for m in ("rna", "atac"):
        mdata[m].obs = mdata[m].obs.drop(columns="modality").assign(mask_rna=mod != "accessibility",
                                                                    mask_atac=mod != "expression")
    mdata.update()
    np.testing.assert_allclose(model.latent(mdata), model.latent(store), **TOL)
    mdata.obs["mask_rna"], mdata.obs["mask_atac"] = True, True
    with pytest.raises(APIError, match=r"obs 'mask_(rna|atac)' and '(rna|atac):mask_(rna|atac)' disagree for cell"):
        model.latent(mdata)


@pytest.mark.parametrize(("value", "said"), [(np.nan, "is missing for cell {c!r}"),
                                             ("rna", "of cell {c!r} is 'rna' \\(1 such cells\\)")])
def test_a_missing_or_unknown_modality_value_names_the_cell(trained, value, said):
    # NaN was read as the text 'nan': "has values ['nan']", naming no cell
    store, model = trained
    mdata = store_to_mudata(store)
    o = mdata.obs.drop(columns=["mask_rna", "mask_atac"])
    o["modality"] = np.where(mdata.obs["mask_rna"] & mdata.obs["mask_atac"], "paired",
                             np.where(mdata.obs["mask_rna"], "expression", "accessibility")).astype(object)
    o.iloc[4, o.columns.get_loc("modality")] = value
    mdata.obs = o
    with pytest.raises(APIError, match=r"obs\['modality'\] " + said.format(c=mdata.obs_names[4])):
        model.latent(mdata)


def test_elbo_of_no_cells_is_an_error_not_nan(trained):
    store, model = trained
    empty = store_to_mudata(store)[:0].copy()
    assert model.latent(empty).shape == (0, model.module.n_latent)  # an empty result where one makes sense
    for f in (model.elbo, model.reconstruction_error):
        with pytest.raises(APIError, match="the data has 0 cells: elbo and reconstruction_error are means"):
            f(empty)


def test_a_list_of_three_anndata_is_refused(trained):
    store, model = trained
    full = store_to_mudata(store)
    rna, atac = full["rna"].copy(), full["atac"].copy()
    with pytest.raises(APIError, match=r"a pair of modalities is \(rna, atac\) .*got 3 items"):
        model.latent([rna, atac, atac])


def test_float16_and_narrow_duplicate_counts_read_as_their_values(trained):
    # dense float16 X: scipy's "does not support dtype float16"; duplicate uint8 entries (200 + 100) were summed
    # in uint8 (44)
    store, model = trained
    full = store_to_mudata(store)
    mask = full.obs[["mask_rna", "mask_atac"]].to_numpy()
    rna, atac = full["rna"].copy(), full["atac"].copy()
    for a in (rna, atac):
        a.obs["batch"] = full.obs.loc[a.obs_names, "batch"].to_numpy()
    dense = np.minimum(rna.X.toarray(), 200)  # float16 (up to 2048) and uint8 hold these integers exactly
    rna.X = sp.csr_matrix(dense)
    want = model.latent({"rna": rna, "atac": atac}, mask=mask)
    half = ad.AnnData(dense.astype(np.float16), obs=rna.obs, var=rna.var)
    np.testing.assert_allclose(model.latent({"rna": half, "atac": atac}, mask=mask), want, **TOL)

    big = dense.copy()
    big[0, 0] = 300  # one cell's count of 300, then the same count as two uint8 entries, 200 + 100
    one = model.latent({"rna": ad.AnnData(sp.csr_matrix(big), obs=rna.obs, var=rna.var), "atac": atac}, mask=mask)
    x = sp.csr_matrix(dense.astype(np.uint8))
    x[0, 0] = 0
    x.eliminate_zeros()
    # row 0 gets two entries for gene 0, as a file may hold them
    data = np.concatenate([[200, 100], x.data]).astype(np.uint8)
    indices = np.concatenate([[0, 0], x.indices]).astype(x.indices.dtype)
    indptr = np.concatenate([[0], x.indptr[1:] + 2])
    dup = sp.csr_matrix((data, indices, indptr), shape=x.shape)
    assert dup.dtype == np.uint8 and dup.nnz == x.nnz + 2
    got = model.latent({"rna": ad.AnnData(dup, obs=rna.obs, var=rna.var), "atac": atac}, mask=mask)
    np.testing.assert_allclose(got, one, **TOL)
