"""Converters on the real multiome data (../shared/data): every count, cell id and feature name survives.

Inputs of each kind (.h5ad pair with partly overlapping cells, .h5mu, scvi-tools layout, 10x ARC .h5,
several inputs at once) are built from the real files in tmp dirs, converted with build_store, and
compared cell by cell and feature by feature with the source matrices.
Run: .venv/bin/python -m pytest tests/test_convert.py -q
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data.build import build_store
from data.config import BuildConfig, InputConfig
from data.store import open_store

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
BMMC = DATA / "neurips2021_bmmc_multiome_starter"
PBMC = DATA / "pbmc_10x_multiome_muon_testsubset"


@pytest.fixture(scope="module")
def bmmc():
    return ad.read_h5ad(BMMC / "bmmc_starter_rna.h5ad"), ad.read_h5ad(BMMC / "bmmc_starter_atac.h5ad")


def _dense_store(path):
    """obs + RNA/ATAC as DataFrames (rows = cell ids, columns = feature names) from a store."""
    st = open_store(path)
    m = st.meta
    mats = {}
    for mod, names in (("rna", m.gene_names), ("atac", m.region_names)):
        x = sp.vstack([st.read_rows(mod, i, 0, m.shard_offsets[i + 1] - m.shard_offsets[i])
                       for i in range(m.n_shards)], format="csr")
        mats[mod] = x
    obs = st.read_obs()
    df = {mod: pd.DataFrame(x.toarray().astype(np.int64), index=obs.index,
                            columns=m.gene_names if mod == "rna" else m.region_names) for mod, x in mats.items()}
    return st, obs, df


def _assert_modality(df, obs, mod, source: ad.AnnData, features=None):
    """Every cell of ``source`` has exactly its counts (on ``features``); other cells are masked + empty."""
    features = list(source.var_names) if features is None else features
    src = pd.DataFrame(source[:, features].X.toarray().astype(np.int64), index=source.obs_names, columns=features)
    got = df[mod].loc[src.index, features]
    np.testing.assert_array_equal(got.to_numpy(), src.to_numpy())
    assert obs.loc[src.index, f"mask_{mod}"].all()
    others = obs.index[~obs.index.isin(src.index)]
    assert not obs.loc[others, f"mask_{mod}"].any()
    assert df[mod].loc[others].to_numpy().sum() == 0


def test_h5ad_pair_partial_overlap_union(tmp_path, bmmc):
    rna, atac = bmmc
    r = rna[:400].copy()
    perm = np.random.default_rng(0).permutation(np.arange(100, 500))
    a = atac[perm].copy()  # different cell order on purpose
    r.write_h5ad(tmp_path / "r.h5ad")
    a.write_h5ad(tmp_path / "a.h5ad")
    cfg = BuildConfig(out=str(tmp_path / "s.zarr"), label_key="cell_type", shard_size=128, block_size=64,
                      progress=False,
                      inputs=[InputConfig(kind="h5ad_pair", rna=str(tmp_path / "r.h5ad"), atac=str(tmp_path / "a.h5ad"))])
    build_store(cfg)
    st, obs, df = _dense_store(tmp_path / "s.zarr")
    assert list(obs.index) == list(r.obs_names) + [c for c in a.obs_names if c not in set(r.obs_names)]
    assert st.meta.gene_names == list(rna.var_names) and st.meta.region_names == list(atac.var_names)
    _assert_modality(df, obs, "rna", r)
    _assert_modality(df, obs, "atac", a)
    assert (obs["mask_rna"] & obs["mask_atac"]).sum() == 300
    assert st.meta.batch_categories == ["s1d1", "s1d2"]
    np.testing.assert_array_equal(obs.loc[r.obs_names, "cell_type"].astype(str), r.obs["cell_type"].astype(str))


def test_h5mu_paired(tmp_path):
    rna = ad.read_h5ad(PBMC / "pbmc_muon_test_rna.h5ad")
    atac = ad.read_h5ad(PBMC / "pbmc_muon_test_atac.h5ad")
    md = mudata.MuData({"rna": rna, "atac": atac[200:].copy()})  # 200 cells RNA-only
    md.obs["donor"] = "pbmc1"
    md.write_h5mu(tmp_path / "m.h5mu")
    build_store(BuildConfig(out=str(tmp_path / "s.zarr"), batch_key="donor", shard_size=300, progress=False,
                            inputs=[InputConfig(kind="h5mu", path=str(tmp_path / "m.h5mu"))]))
    st, obs, df = _dense_store(tmp_path / "s.zarr")
    assert st.meta.n_cells == 1000 and st.meta.shard_offsets == [0, 300, 600, 900, 1000]
    _assert_modality(df, obs, "rna", rna)
    _assert_modality(df, obs, "atac", atac[200:])
    assert list(st.features["atac"].columns[:3]) == ["chrom", "start", "end"]
    assert st.features["atac"]["start"].iloc[0] == int(atac.var_names[0].split(":")[1].split("-")[0])


@pytest.mark.parametrize("how", ["var_modality", "n_genes"])
def test_scvi_single_anndata_layout(tmp_path, bmmc, how):
    rna, atac = bmmc
    X = sp.hstack([rna.X, atac.X], format="csr")
    var = pd.DataFrame(index=list(rna.var_names) + list(atac.var_names))
    if how == "var_modality":
        var["modality"] = ["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars
    obs = rna.obs[["batch", "cell_type"]].copy()
    # scvi-tools' organize_multiome_anndatas convention: obs['modality'] says what was measured.
    obs["modality"] = np.where(np.arange(500) < 100, "expression",
                               np.where(np.arange(500) < 150, "accessibility", "paired"))
    X = X.tolil()
    X[:100, rna.n_vars:] = 0
    X[100:150, :rna.n_vars] = 0
    ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var).write_h5ad(tmp_path / "scvi.h5ad")
    inp = InputConfig(kind="scvi", path=str(tmp_path / "scvi.h5ad"),
                      n_genes=rna.n_vars if how == "n_genes" else None)
    build_store(BuildConfig(out=str(tmp_path / "s.zarr"), shard_size=200, progress=False, inputs=[inp]))
    st, obs_s, df = _dense_store(tmp_path / "s.zarr")
    assert st.meta.gene_names == list(rna.var_names) and st.meta.region_names == list(atac.var_names)
    _assert_modality(df, obs_s, "rna", rna[np.r_[0:100, 150:500]])
    _assert_modality(df, obs_s, "atac", atac[100:500])


def _write_tenx_h5(path, rna: ad.AnnData, atac: ad.AnnData):
    """Cell Ranger ARC filtered_feature_bc_matrix.h5 layout: CSC (features x barcodes)."""
    X = sp.hstack([rna.X, atac.X], format="csr")  # cells x features == CSC of features x cells
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(rna.obs_names, dtype="S")
        m["data"], m["indices"], m["indptr"] = X.data.astype(np.int32), X.indices.astype(np.int64), X.indptr
        m["shape"] = np.array([X.shape[1], X.shape[0]], dtype=np.int32)
        ft = m.create_group("features")
        ids = [f"ENSG{i:011d}" for i in range(rna.n_vars)] + list(atac.var_names)
        names = list(rna.var_names) + list(atac.var_names)
        ft["id"], ft["name"] = np.array(ids, dtype="S"), np.array(names, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars, dtype="S")
        ft["genome"] = np.array(["GRCh38"] * X.shape[1], dtype="S")


def test_tenx_arc_h5(tmp_path):
    rna = ad.read_h5ad(PBMC / "pbmc_muon_test_rna.h5ad")
    atac = ad.read_h5ad(PBMC / "pbmc_muon_test_atac.h5ad")
    _write_tenx_h5(tmp_path / "filtered_feature_bc_matrix.h5", rna, atac)
    build_store(BuildConfig(out=str(tmp_path / "s.zarr"), batch_key=None, progress=False, block_size=128,
                            inputs=[InputConfig(kind="tenx_h5", path=str(tmp_path / "filtered_feature_bc_matrix.h5"),
                                                batch="pbmc")]))
    st, obs, df = _dense_store(tmp_path / "s.zarr")
    assert st.meta.batch_categories == ["pbmc"] and list(obs.index) == list(rna.obs_names)
    _assert_modality(df, obs, "rna", rna)
    _assert_modality(df, obs, "atac", atac)
    assert list(st.features["rna"]["gene_ids"][:2]) == ["ENSG00000000000", "ENSG00000000001"]


@pytest.mark.parametrize("join", ["intersection", "union"])
def test_several_inputs_multiome_rna_only_atac_only(tmp_path, bmmc, join):
    rna, atac = bmmc
    multi = mudata.MuData({"rna": rna[:200].copy(), "atac": atac[:200].copy()})
    multi.obs["batch"] = rna.obs["batch"][:200].astype(str)
    multi.write_h5mu(tmp_path / "multi.h5mu")
    rna_only = rna[200:350, 50:].copy()  # lacks the first 50 genes
    rna_only.write_h5ad(tmp_path / "rna_only.h5ad")
    atac_only = atac[350:, :550].copy()  # lacks the last 50 peaks
    atac_only.write_h5ad(tmp_path / "atac_only.h5ad")
    cfg = BuildConfig(out=str(tmp_path / "s.zarr"), feature_join=join, label_key="cell_type", progress=False,
                      shard_size=100, block_size=70, inputs=[
                          InputConfig(kind="h5mu", path=str(tmp_path / "multi.h5mu")),
                          InputConfig(kind="h5ad_pair", rna=str(tmp_path / "rna_only.h5ad")),
                          InputConfig(kind="h5ad_pair", atac=str(tmp_path / "atac_only.h5ad"))])
    build_store(cfg)
    st, obs, df = _dense_store(tmp_path / "s.zarr")
    assert list(obs.index) == list(rna.obs_names)
    genes = list(rna.var_names[50:]) if join == "intersection" else list(rna.var_names)
    peaks = list(atac.var_names[:550]) if join == "intersection" else list(atac.var_names)
    assert st.meta.gene_names == genes and st.meta.region_names == peaks
    dropped = st.meta.source["dropped_features"]
    if join == "intersection":
        assert dropped["rna"][str(tmp_path / "multi.h5mu")]["n"] == 50
        assert dropped["atac"][str(tmp_path / "multi.h5mu")]["n"] == 50
    # Every count of every input on the kept features; cells of other inputs masked and empty.
    multi_rna, multi_atac = rna[:200], atac[:200]
    for mod, parts in (("rna", [multi_rna, rna_only]), ("atac", [multi_atac, atac_only])):
        for part in parts:
            feats = [f for f in (genes if mod == "rna" else peaks) if f in set(part.var_names)]
            src = part[:, feats].X.toarray()
            np.testing.assert_array_equal(df[mod].loc[part.obs_names, feats].to_numpy(), src)
        measured = pd.Index(np.concatenate([p.obs_names for p in parts]))
        assert obs[f"mask_{mod}"].to_numpy().tolist() == obs.index.isin(measured).tolist()
    if join == "union":  # the RNA-only input lacked the first 50 genes: zeros there
        assert df["rna"].loc[rna_only.obs_names, list(rna.var_names[:50])].to_numpy().sum() == 0


def test_preshuffle_and_filters(tmp_path, bmmc):
    rna, atac = bmmc
    ins = [InputConfig(kind="h5ad_pair", rna=str(BMMC / "bmmc_starter_rna.h5ad"),
                       atac=str(BMMC / "bmmc_starter_atac.h5ad"))]
    build_store(BuildConfig(out=str(tmp_path / "a.zarr"), preshuffle=True, seed=1, shard_size=128, block_size=100,
                            min_gene_fraction=0.05, min_region_fraction=0.02, progress=False, inputs=ins))
    build_store(BuildConfig(out=str(tmp_path / "b.zarr"), preshuffle=True, seed=1, shard_size=128, block_size=100,
                            min_gene_fraction=0.05, min_region_fraction=0.02, progress=False, inputs=ins))
    st, obs, df = _dense_store(tmp_path / "a.zarr")
    _, obs_b, _ = _dense_store(tmp_path / "b.zarr")
    assert list(obs.index) == list(obs_b.index)  # seeded: same order twice
    assert sorted(obs.index) == sorted(rna.obs_names) and list(obs.index) != list(rna.obs_names)
    # Shards mix both donors (random order, not input order).
    first = obs.iloc[:128]["batch"].astype(str)
    assert first.nunique() == 2
    det_g = (rna.X > 0).mean(0).A1
    det_r = (atac.X > 0).mean(0).A1
    assert st.meta.gene_names == list(rna.var_names[det_g >= 0.05])
    assert st.meta.region_names == list(atac.var_names[det_r >= 0.02])
    assert 0 < len(st.meta.gene_names) < rna.n_vars
    _assert_modality(df, obs, "rna", rna, st.meta.gene_names)
    _assert_modality(df, obs, "atac", atac, st.meta.region_names)
    np.testing.assert_array_equal(obs["cell_index"].to_numpy(), np.arange(500))
    assert st.meta.source["filtered_features"]["rna"]["n"] == rna.n_vars - len(st.meta.gene_names)


def test_dense_x_is_read_in_blocks_and_csc_is_refused_clearly(tmp_path, bmmc):
    rna, _atac = bmmc
    dense = ad.AnnData(X=rna.X.toarray(), obs=rna.obs, var=rna.var)
    dense.write_h5ad(tmp_path / "dense.h5ad")
    build_store(BuildConfig(out=str(tmp_path / "s.zarr"), block_size=77, progress=False,
                            inputs=[InputConfig(kind="h5ad_pair", rna=str(tmp_path / "dense.h5ad"))]))
    st, obs, df = _dense_store(tmp_path / "s.zarr")
    _assert_modality(df, obs, "rna", rna)
    assert st.meta.n_regions == 0 and not obs["mask_atac"].any()
    ad.AnnData(X=sp.csc_matrix(rna.X), obs=rna.obs, var=rna.var).write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="csc.h5ad: X is stored as CSC"):
        build_store(BuildConfig(out=str(tmp_path / "t.zarr"), progress=False,
                                inputs=[InputConfig(kind="h5ad_pair", rna=str(tmp_path / "csc.h5ad"))]))
    assert not (tmp_path / "t.zarr").exists()


def test_counts_in_a_layer_are_read_with_layer_and_a_normalised_x_says_so(tmp_path, bmmc):
    """scanpy workflows normalise X in place and keep the counts in layers['counts']: X is refused with a
    pointer to inputs[i].layer, and layer=counts builds exactly the store of the raw file (the raw ATAC
    file of the pair, without that layer, is read from X)."""
    rna, atac = bmmc
    raw = tmp_path / "raw.h5ad"
    rna.write_h5ad(raw)
    norm = rna.copy()
    norm.layers["counts"] = norm.X.copy()
    norm.X = sp.csr_matrix(norm.X.multiply(1e4 / np.maximum(norm.X.sum(axis=1), 1)).log1p())
    norm.write_h5ad(tmp_path / "norm.h5ad")

    def build(out: str, path: Path, layer: str | None = None) -> None:
        build_store(BuildConfig(out=str(tmp_path / out), progress=False, inputs=[
            InputConfig(kind="h5ad_pair", rna=str(path), atac=str(BMMC / "bmmc_starter_atac.h5ad"), layer=layer)]))

    with pytest.raises(ValueError, match=r"is not an integer .*set the input's layer=<name>"):
        build("x.zarr", tmp_path / "norm.h5ad")
    with pytest.raises(ValueError, match=r"no AnnData has layer 'raw'"):
        build("x.zarr", tmp_path / "norm.h5ad", layer="raw")
    build("raw.zarr", raw)
    build("layer.zarr", tmp_path / "norm.h5ad", layer="counts")
    (_, obs_a, df_a), (_, obs_b, df_b) = _dense_store(tmp_path / "raw.zarr"), _dense_store(tmp_path / "layer.zarr")
    pd.testing.assert_frame_equal(obs_a, obs_b)
    for mod in ("rna", "atac"):
        pd.testing.assert_frame_equal(df_a[mod], df_b[mod])
    mudata.MuData({"rna": norm, "atac": atac}).write_h5mu(tmp_path / "norm.h5mu")  # the same in an .h5mu
    build_store(BuildConfig(out=str(tmp_path / "mu.zarr"), progress=False,
                            inputs=[InputConfig(kind="h5mu", path=str(tmp_path / "norm.h5mu"), layer="counts")]))
    df_c = _dense_store(tmp_path / "mu.zarr")[2]
    for mod in ("rna", "atac"):
        pd.testing.assert_frame_equal(df_a[mod], df_c[mod].loc[df_a[mod].index])
