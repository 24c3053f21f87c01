"""The unpaired scenario of the quality harness: the split, and that hidden counts never reach either
side's training input (our store built by mva-build, the reference's MuData)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.quality.data import read_pair, read_store
from trainer.quality.scenario import make_scenario, training_view

BMMC = Path("/work/shared/data/neurips2021_bmmc_multiome_starter")
if not BMMC.is_dir():
    BMMC = Path(__file__).resolve().parents[2] / "shared/data/neurips2021_bmmc_multiome_starter"


@pytest.fixture(scope="module")
def bmmc():
    return read_pair(BMMC / "bmmc_starter_rna.h5ad", BMMC / "bmmc_starter_atac.h5ad", "batch", "cell_type")


@pytest.mark.parametrize("n,fraction", [(500, 1.0), (500, 0.5), (501, 0.25), (10, 0.1), (7, 0.0)])
def test_split_partitions_cells(n, fraction):
    sc = make_scenario(n, fraction, seed=3)
    allc = np.concatenate([sc.paired, sc.rna_only, sc.atac_only])
    assert np.array_equal(np.sort(allc), np.arange(n))  # disjoint and complete
    assert len(sc.paired) == round(fraction * n)
    assert abs(len(sc.rna_only) - len(sc.atac_only)) <= 1
    m = sc.mask
    assert m[sc.paired].all() and not m[sc.rna_only, 1].any() and m[sc.rna_only, 0].all()
    assert not m[sc.atac_only, 0].any() and m[sc.atac_only, 1].all()


def test_split_is_seeded_and_nested():
    a, b, c = make_scenario(1000, 0.5, 0), make_scenario(1000, 0.5, 0), make_scenario(1000, 0.5, 1)
    assert np.array_equal(a.paired, b.paired) and np.array_equal(a.rna_only, b.rna_only)
    assert not np.array_equal(a.paired, c.paired)
    # a smaller fraction keeps a subset of the larger fraction's paired cells
    assert set(make_scenario(1000, 0.1, 0).paired) <= set(make_scenario(1000, 0.25, 0).paired) <= set(a.paired)


def test_bad_inputs():
    with pytest.raises(ValueError, match="fraction"):
        make_scenario(10, 1.5, 0)
    with pytest.raises(ValueError, match="at least one cell"):
        make_scenario(0, 0.5, 0)
    sc = make_scenario(10, 0.5, 0)
    import scipy.sparse as sp
    with pytest.raises(ValueError, match="10 cells"):
        training_view(sc, sp.csr_matrix((9, 3)), sp.csr_matrix((10, 3)))


def test_training_view_empties_hidden_rows_only(bmmc):
    sc = make_scenario(bmmc.n_cells, 0.25, 0)
    r, a = training_view(sc, bmmc.rna, bmmc.atac)
    assert np.diff(r.indptr)[sc.atac_only].sum() == 0 and np.diff(a.indptr)[sc.rna_only].sum() == 0
    keep_r = np.setdiff1d(np.arange(bmmc.n_cells), sc.atac_only)
    assert (r[keep_r] != bmmc.rna[keep_r]).nnz == 0
    keep_a = np.setdiff1d(np.arange(bmmc.n_cells), sc.rna_only)
    assert (a[keep_a] != bmmc.atac[keep_a]).nnz == 0


def test_built_store_holds_no_hidden_counts(bmmc, tmp_path):
    from trainer.quality.ours import build_view_store

    sc = make_scenario(bmmc.n_cells, 0.5, 1)
    store, order = build_view_store(bmmc, sc, tmp_path)
    rna, atac, obs = read_store(store)
    assert sorted(order) == list(range(bmmc.n_cells))  # every cell once (hidden cells keep the other modality)
    has = sc.mask[order]
    assert np.array_equal(obs["mask_rna"].to_numpy(), has[:, 0])
    assert np.array_equal(obs["mask_atac"].to_numpy(), has[:, 1])
    # hidden modalities are empty rows; visible ones are exactly the input counts
    assert np.diff(rna.indptr)[~has[:, 0]].sum() == 0 and np.diff(atac.indptr)[~has[:, 1]].sum() == 0
    assert (rna[has[:, 0]] != bmmc.rna[order[has[:, 0]]]).nnz == 0
    assert (atac[has[:, 1]] != bmmc.atac[order[has[:, 1]]]).nnz == 0
    assert rna.sum() == bmmc.rna.sum() - bmmc.rna[sc.atac_only].sum() < bmmc.rna.sum()


@pytest.mark.reference
def test_reference_mudata_masks_with_zero_rows(bmmc):
    pytest.importorskip("scvi")
    from trainer.quality.reference import reference_mudata

    sc = make_scenario(bmmc.n_cells, 0.5, 2)
    cells = np.arange(0, bmmc.n_cells, 2)  # e.g. the training cells
    md = reference_mudata(bmmc, sc, cells, ["s1d1", "s1d2"])
    rna, atac = md["rna"].X, md["atac"].X
    rs, as_ = np.asarray(rna.sum(1)).ravel(), np.asarray(atac.sum(1)).ravel()
    hid_r, hid_a = np.isin(cells, sc.atac_only), np.isin(cells, sc.rna_only)
    # MULTIVI recognises a missing modality by a zero row sum: hidden rows must be exactly zero,
    # and every other row must hold its true counts
    assert (rs[hid_r] == 0).all() and (as_[hid_a] == 0).all()
    assert np.allclose(rs[~hid_r], np.asarray(bmmc.rna[cells[~hid_r]].sum(1)).ravel())
    assert np.allclose(as_[~hid_a], np.asarray(bmmc.atac[cells[~hid_a]].sum(1)).ravel())
    assert list(md["rna"].obs_names) == list(bmmc.cell_ids[cells])
