"""mva-build on awkward but legal inputs, and on outputs it must not touch (each case a bug found in review):
batch and label names that depend on how pandas typed a column, masks stored as text, stored zeros,
inputs named alike, obs columns that clash with the store's own, overwrite of a path that is no store.

    .venv/bin/python -m pytest tests/test_build_inputs.py -q
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data.build import build_store
from data.config import BuildConfig, InputConfig
from data.store import open_store
from data.typed_config import ConfigError
from data.validate import ValidationError


def _pair(n=6, g=4, r=3, seed=0, prefix="c", obs=None):
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}{i}" for i in range(n)]
    o = pd.DataFrame(obs if obs is not None else {"batch": ["b0"] * n}, index=ids)
    rna = ad.AnnData(sp.csr_matrix(rng.poisson(2, (n, g)).astype(np.int32) + 1), obs=o.copy(),
                     var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    atac = ad.AnnData(sp.csr_matrix(rng.poisson(1, (n, r)).astype(np.int32) + 1), obs=o.copy(),
                      var=pd.DataFrame(index=[f"chr1:{100 * j}-{100 * j + 50}" for j in range(r)]))
    return rna, atac


def _write_pair(d, rna, atac, name="x"):
    (d / name).mkdir(parents=True, exist_ok=True)
    rna.write_h5ad(d / name / "rna.h5ad")
    atac.write_h5ad(d / name / "atac.h5ad")
    return InputConfig(kind="h5ad_pair", rna=str(d / name / "rna.h5ad"), atac=str(d / name / "atac.h5ad"))


def _build(tmp_path, inputs, **kw):
    return open_store(build_store(BuildConfig(out=str(tmp_path / "s.zarr"), progress=False, inputs=inputs, **kw)))


def test_text_of_obs_values_does_not_depend_on_how_pandas_typed_the_column():
    from data.build import as_text

    assert list(as_text(pd.Series([1, 2]))) == ["1", "2"]
    assert list(as_text(pd.Series([1.0, np.nan]))) == ["1", None]  # int upcast to float by a missing value
    assert list(as_text(pd.Series([1, None], dtype="Int64"))) == ["1", None]
    assert list(as_text(pd.Series(pd.Categorical([0, 1, None])))) == ["0", "1", None]
    assert list(as_text(pd.Series(["a", 1.5, None], dtype=object))) == ["a", "1.5", None]
    # float32 in its own shortest form (as a Python float 0.1f32 is "0.10000000149011612")
    assert list(as_text(pd.Series(np.array([0.1, 2.3, 3.0], np.float32)))) == ["0.1", "2.3", "3"]
    assert list(as_text(pd.Series([0.1, None], dtype="Float32"))) == ["0.1", None]
    # float64 values that are float32 numbers (a float32 column upcast by a join) too; huge ones stay short
    assert list(as_text(pd.Series(np.array([0.1, 2.3], np.float32).astype(np.float64)))) == ["0.1", "2.3"]
    assert list(as_text(pd.Series([1 / 3, 1e300]))) == ["0.3333333333333333", "1e+300"]


def as_text_names(st) -> dict:
    obs = st.read_obs()
    return {c: str(obs.loc[c, "dose"]) for c in ("c9", "c0", "c2")}


def test_float32_and_float64_values_name_the_same_batch(tmp_path):
    """A dose column float32 in one input and float64 in the other made each dose two batches."""
    rna, atac = _pair(obs={"dose": np.array([0.1, 2.3] * 3, np.float32)})
    rna2, atac2 = _pair(prefix="d", obs={"dose": np.array([0.1, 2.3] * 3, np.float64)})
    st = _build(tmp_path, [_write_pair(tmp_path, rna, atac), _write_pair(tmp_path, rna2, atac2, name="y")],
                batch_key="dose")
    assert st.meta.batch_categories == ["0.1", "2.3"]
    assert st.read_obs()["dose"].value_counts().to_dict() == {"0.1": 6, "2.3": 6}
    # one pair, float32 in the RNA obs and float64 in the ATAC obs: pandas joins them as float64, which upcast the
    # RNA cells' 0.1 to 0.10000000149011612 (the ATAC-only cell of the same donor named "0.1")
    rna, atac = _pair(obs={"dose": np.array([0.1, 0.1, 0.2, 0.1, 0.1, 0.2], np.float32)})
    atac.obs["dose"] = atac.obs["dose"].astype(np.float64)
    atac.obs.loc["c5", "dose"] = 0.1
    atac.obs_names = [*atac.obs_names[:5], "c9"]  # c9: ATAC-only
    st = _build(tmp_path / "pair", [_write_pair(tmp_path, rna, atac, name="z")], batch_key="dose")
    assert st.meta.batch_categories == ["0.1", "0.2"]
    assert as_text_names(st) == {"c9": "0.1", "c0": "0.1", "c2": "0.2"}


def test_integer_batch_ids_name_the_same_batch_in_every_input(tmp_path):
    """A pair whose ATAC obs lacks the column (pandas upcast it to float: '1.0') plus an RNA-only input
    ('1') made one donor two batches."""
    rna, atac = _pair(obs={"donor": [1, 1, 1, 2, 2, 2]})
    atac.obs = atac.obs.drop(columns="donor")
    rna2, _ = _pair(prefix="d", obs={"donor": [1, 2, 1, 2, 1, 2]})
    (tmp_path / "r").mkdir()
    rna2.write_h5ad(tmp_path / "r" / "rna.h5ad")
    st = _build(tmp_path, [_write_pair(tmp_path, rna, atac), InputConfig(kind="h5ad_pair", rna=str(tmp_path / "r" / "rna.h5ad"))],
                batch_key="donor")
    assert st.meta.batch_categories == ["1", "2"]


def test_partly_missing_labels_keep_their_names_also_preshuffled(tmp_path):
    labels = pd.Series([0, 1, None, 2, 1, 0], dtype="Int64")
    rna, atac = _pair(obs={"batch": ["b0"] * 6, "cluster": labels.to_numpy()})
    inp = _write_pair(tmp_path, rna, atac)
    for pre in (False, True):
        st = open_store(build_store(BuildConfig(out=str(tmp_path / f"s{pre}.zarr"), progress=False, inputs=[inp],
                                                label_key="cluster", preshuffle=pre)))
        assert st.meta.label_categories == ["0", "1", "2"], pre


def test_label_key_that_no_input_has_is_refused(tmp_path):
    """A misspelt label_key (``celltype`` for ``cell_type``) built a store whose every label was unknown."""
    rna, atac = _pair(obs={"batch": ["b0"] * 6, "cell_type": ["a", "b"] * 3})
    inp = _write_pair(tmp_path, rna, atac)
    with pytest.raises(ValidationError, match=r"no input has the label column 'celltype'.*'cell_type'"):
        _build(tmp_path, [inp], label_key="celltype")
    assert not list(tmp_path.glob("s.zarr*"))
    rna2, _ = _pair(prefix="d", obs={"batch": ["b0"] * 6})  # one unlabelled input among labelled ones is fine
    (tmp_path / "r").mkdir()
    rna2.write_h5ad(tmp_path / "r" / "rna.h5ad")
    st = _build(tmp_path, [inp, InputConfig(kind="h5ad_pair", rna=str(tmp_path / "r" / "rna.h5ad"))],
                label_key="cell_type")
    assert st.meta.label_categories == ["a", "b"]


def test_a_missing_batch_column_names_batch_key_null(tmp_path):
    """Inputs without a batch column (one sample) stopped without naming the documented way out."""
    rna, atac = _pair(obs={"donor": ["d"] * 6})
    inp = _write_pair(tmp_path, rna, atac)
    with pytest.raises(ValidationError, match=r"no column 'batch' \(batch_key\).*'donor'.*batch_key=null"):
        _build(tmp_path, [inp])
    assert _build(tmp_path, [inp], batch_key=None).meta.batch_categories == ["rna"]


def test_masks_stored_as_text_are_read_as_written(tmp_path):
    """astype(bool) read the text 'False' as True: RNA-only cells became 'ATAC measured, all zero'."""
    rna, atac = _pair(n=10)
    x = np.hstack([rna.X.toarray(), atac.X.toarray()])
    x[5:, rna.n_vars:] = 0
    var = pd.DataFrame({"modality": ["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars},
                       index=list(rna.var_names) + list(atac.var_names))
    obs = pd.DataFrame({"batch": ["b0"] * 10, "mask_rna": ["True"] * 10, "mask_atac": ["True"] * 5 + ["False"] * 5},
                       index=rna.obs_names)
    ad.AnnData(sp.csr_matrix(x), obs=obs, var=var).write_h5ad(tmp_path / "scvi.h5ad")
    st = _build(tmp_path, [InputConfig(kind="scvi", path=str(tmp_path / "scvi.h5ad"))])
    assert st.read_obs()["mask_atac"].tolist() == [True] * 5 + [False] * 5
    obs["mask_atac"] = ["True"] * 5 + ["maybe"] * 5
    ad.AnnData(sp.csr_matrix(x), obs=obs, var=var).write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match=r"mask_atac.*'maybe'; expected True/False"):
        build_store(BuildConfig(out=str(tmp_path / "bad.zarr"), progress=False,
                                inputs=[InputConfig(kind="scvi", path=str(tmp_path / "bad.h5ad"))]))


def test_a_stored_zero_is_no_count(tmp_path):
    """A stored 0 in an RNA-only cell's peak column refused the build ('has atac counts but mask_atac is
    False'); stored zeros never reach the store."""
    rna, atac = _pair(n=10)
    x = np.hstack([rna.X.toarray(), atac.X.toarray()]).astype(np.int32)
    x[5:, rna.n_vars:] = 0
    m = sp.csr_matrix(x).tolil()
    m[7, rna.n_vars + 1] = 1
    m = m.tocsr()
    row = slice(m.indptr[7], m.indptr[8])
    m.data[row][m.indices[row] == rna.n_vars + 1] = 0  # a stored zero (scipy keeps it until eliminate_zeros)
    assert m.nnz == sp.csr_matrix(x).nnz + 1
    var = pd.DataFrame({"modality": ["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars},
                       index=list(rna.var_names) + list(atac.var_names))
    obs = pd.DataFrame({"batch": ["b0"] * 10, "modality": ["paired"] * 5 + ["expression"] * 5}, index=rna.obs_names)
    ad.AnnData(m, obs=obs, var=var).write_h5ad(tmp_path / "scvi.h5ad")
    st = _build(tmp_path, [InputConfig(kind="scvi", path=str(tmp_path / "scvi.h5ad"))])
    atac_rows = st.read_rows("atac", 0, 0, 10)
    assert atac_rows.nnz == sp.csr_matrix(x[:, rna.n_vars:]).nnz and (atac_rows.data != 0).all()


def test_inputs_named_alike_do_not_merge_into_one_batch(tmp_path):
    """With batch_key null each input is a batch named by its file: two rna.h5ad pairs were one batch."""
    a = _write_pair(tmp_path, *_pair(prefix="a"), name="sample1")
    b = _write_pair(tmp_path, *_pair(prefix="b"), name="sample2")
    with pytest.raises(ValidationError, match="would both be batch 'rna'.*inputs\\[i\\]\\.batch"):
        _build(tmp_path, [a, b], batch_key=None)
    a.batch, b.batch = "s1", "s2"
    assert _build(tmp_path, [a, b], batch_key=None).meta.batch_categories == ["s1", "s2"]


def test_obs_keys_that_clash_with_the_stores_columns_are_refused(tmp_path):
    inp = _write_pair(tmp_path, *_pair(obs={"batch": ["b0"] * 6, "lane": ["l1"] * 6}))
    with pytest.raises(ValidationError, match=r"cat_cov_keys \['batch'\] would overwrite"):
        _build(tmp_path, [inp], batch_key=None, cat_cov_keys=["batch"])
    with pytest.raises(ValidationError, match=r"label_key \['mask_rna'\] would overwrite"):
        _build(tmp_path, [inp], label_key="mask_rna")
    # one obs column per name: the float32 covariate overwrote the label's categories (the loader then refused)
    with pytest.raises(ConfigError, match=r"label_key 'lane' is also in cont_cov_keys"):
        _build(tmp_path, [inp], cont_cov_keys=["lane"], label_key="lane")
    assert not list(tmp_path.glob("s.zarr*"))


def test_rna_and_atac_swapped_are_refused(tmp_path):
    """The ATAC file given as rna built a store of peaks called genes without a word; its own var column
    ``feature_types`` said Peaks."""
    rna, atac = _pair()
    rna.var["feature_types"], atac.var["feature_types"] = "Gene Expression", "Peaks"
    inp = _write_pair(tmp_path, rna, atac)
    swapped = InputConfig(kind="h5ad_pair", rna=inp.atac, atac=inp.rna)
    with pytest.raises(ValueError, match=r"atac.h5ad: given as rna, but its var\['feature_types'\] names every "
                       r"feature 'Peaks' \(peaks\): are rna and atac swapped\?"):
        _build(tmp_path, [swapped])
    with pytest.raises(ValueError, match=r"given as atac, but .*'Gene Expression' \(genes\)"):
        _build(tmp_path, [InputConfig(kind="h5ad_pair", atac=inp.rna)])
    assert _build(tmp_path, [inp]).meta.n_genes == 4  # the right way round builds


def test_pre_0_7_h5ad_is_refused_in_one_line(tmp_path):
    """anndata < 0.7 stored obs/var as HDF5 tables: an AttributeError traceback from the reader."""
    import h5py

    x = sp.csr_matrix(np.arange(12, dtype=np.float32).reshape(4, 3))
    path = tmp_path / "legacy.h5ad"
    with h5py.File(path, "w") as f:
        f["obs"] = np.array([(f"c{i}".encode(), b"b") for i in range(4)], dtype=[("index", "S5"), ("batch", "S2")])
        f["var"] = np.array([(f"g{i}".encode(),) for i in range(3)], dtype=[("index", "S5")])
        g = f.create_group("X")
        g.attrs["h5sparse_format"], g.attrs["h5sparse_shape"] = "csr", (4, 3)
        g["data"], g["indices"], g["indptr"] = x.data, x.indices, x.indptr
    with pytest.raises(ValueError, match=r"legacy.h5ad: an .h5ad of anndata < 0.7 .*write_h5ad"):
        _build(tmp_path, [InputConfig(kind="h5ad_pair", rna=str(path))])


def test_a_bad_count_is_reported_by_cell_not_by_block_row(tmp_path):
    """The row given was the row within the block or shard being checked (5, 15 or 95 for the same cell)."""
    rna, atac = _pair(n=50)
    rna.X = rna.X.astype(np.float32)
    rna.X[45, 1] = 2.5
    inp = _write_pair(tmp_path, rna, atac)
    for kw in ({"block_size": 20, "shard_size": 15}, {"preshuffle": True, "block_size": 20}, {}):
        with pytest.raises(ValidationError, match=r"rna count of cell 'c45', feature 'g1': value 2.5 is not an integer"):
            _build(tmp_path, [inp], **kw)


def test_dropped_cells_leave_no_categories_behind(tmp_path):
    """drop_empty_cells: a batch or label only dropped cells had was still a category (a phantom batch
    with no cells for the model)."""
    rna, atac = _pair(n=8)
    x = np.hstack([rna.X.toarray(), atac.X.toarray()])
    x[6:] = 0
    var = pd.DataFrame({"modality": ["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars},
                       index=list(rna.var_names) + list(atac.var_names))
    obs = pd.DataFrame({"batch": ["keep"] * 6 + ["gone"] * 2, "ct": ["x"] * 6 + ["only_dropped"] * 2,
                        "mask_rna": [True] * 6 + [False] * 2, "mask_atac": [True] * 6 + [False] * 2},
                       index=rna.obs_names)
    m = sp.csr_matrix(x)
    m.eliminate_zeros()
    ad.AnnData(m, obs=obs, var=var).write_h5ad(tmp_path / "scvi.h5ad")
    st = _build(tmp_path, [InputConfig(kind="scvi", path=str(tmp_path / "scvi.h5ad"))], label_key="ct",
                drop_empty_cells=True)
    assert st.meta.n_cells == 6
    assert st.meta.batch_categories == ["keep"] and st.meta.label_categories == ["x"]


def test_overwrite_replaces_a_store_and_nothing_else(tmp_path):
    inp = _write_pair(tmp_path, *_pair())
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    with pytest.raises(ValidationError, match="is not a multivi-atlas store"):
        build_store(BuildConfig(out=str(project), overwrite=True, progress=False, inputs=[inp]))
    assert (project / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValidationError, match="is not a multivi-atlas store"):
        build_store(BuildConfig(out=str(tmp_path / "afile"), overwrite=True, progress=False, inputs=[inp]))
    assert not list(tmp_path.glob("afile.tmp-*"))
    out = build_store(BuildConfig(out=str(tmp_path / "s.zarr"), progress=False, inputs=[inp]))
    build_store(BuildConfig(out=str(out), overwrite=True, progress=False, inputs=[inp]))  # a store: replaced
    assert open_store(out).meta.n_cells == 6
    assert not list(tmp_path.glob("s.zarr.old-*"))  # the old store, moved aside until the new one was in place


def test_dict_inputs_and_bad_sizes(tmp_path):
    inp = _write_pair(tmp_path, *_pair())
    st = open_store(build_store(BuildConfig(out=str(tmp_path / "d.zarr"), progress=False,
                                            inputs=[{"kind": "h5ad_pair", "rna": inp.rna, "atac": inp.atac}])))
    assert st.meta.n_cells == 6
    with pytest.raises(ValidationError, match="block_size and shard_size must be >= 1"):
        build_store(BuildConfig(out=str(tmp_path / "b.zarr"), progress=False, inputs=[inp], block_size=0))


def test_h5mu_global_obs_fills_a_column_only_one_modality_has(tmp_path):
    # batch in mod/rna's obs and in the global obs: the ATAC-only cells had NaN from the joined modality obs
    # and the build failed ("missing for cell") although the .h5mu's own obs had their batch
    import mudata

    rna, atac = _pair(n=8, obs={"batch": ["b0"] * 4 + ["b1"] * 4})
    rna, atac = rna[:6].copy(), atac[3:].copy()
    del atac.obs["batch"]
    md = mudata.MuData({"rna": rna, "atac": atac})
    md.obs["batch"] = ["b0"] * 4 + ["b1"] * 4
    md.write(tmp_path / "m.h5mu")
    st = _build(tmp_path, [InputConfig(kind="h5mu", path=str(tmp_path / "m.h5mu"))])
    obs = st.read_obs()
    assert obs["batch"].astype(str).to_dict() == {f"c{i}": "b0" if i < 4 else "b1" for i in range(8)}
    assert obs["mask_rna"].sum() == 6 and obs["mask_atac"].sum() == 5


@pytest.mark.parametrize("preshuffle", [False, True])
def test_an_obs_index_named_like_a_store_column_is_written(tmp_path, preshuffle):
    # the cell-id index keeps its name in the store's obs; named like one of the store's own columns, anndata
    # refused to write the shard ("index.name is also used by a column") and the build failed
    rna, atac = _pair()
    for a in (rna, atac):
        a.obs.index.name = "cell_index"
    st = _build(tmp_path, [_write_pair(tmp_path, rna, atac)], preshuffle=preshuffle)
    obs = st.read_obs()
    assert sorted(obs.index) == sorted(rna.obs_names) and list(obs["cell_index"]) == list(range(6))


def test_h5mu_modalities_that_are_not_read_are_reported(tmp_path, caplog):
    # ATAC stored under a name not in ATAC_MOD_NAMES ("chromatin") gave an RNA-only store without a word
    import mudata

    rna, atac = _pair()
    mudata.MuData({"rna": rna, "chromatin": atac}).write(tmp_path / "m.h5mu")
    with caplog.at_level(logging.WARNING, logger="mva-build"):
        st = _build(tmp_path, [InputConfig(kind="h5mu", path=str(tmp_path / "m.h5mu"))])
    assert st.meta.n_regions == 0
    msgs = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert len(msgs) == 1 and "['chromatin']" in msgs[0] and "no ATAC" in msgs[0], msgs


def test_a_pair_without_a_single_shared_cell_id_is_reported(tmp_path, caplog):
    # RNA ids "c0-1", ATAC ids "c0" (a barcode suffix dropped by one tool): the same cells became RNA-only
    # plus ATAC-only cells, no cell paired, and nothing said so
    rna, atac = _pair()
    rna.obs_names = [f"{c}-1" for c in rna.obs_names]
    with caplog.at_level(logging.WARNING, logger="mva-build"):
        st = _build(tmp_path, [_write_pair(tmp_path, rna, atac)])
    obs = st.read_obs()
    assert len(obs) == 12 and not (obs["mask_rna"] & obs["mask_atac"]).any()
    msgs = [r.getMessage() for r in caplog.records if "no cell is paired" in r.getMessage()]
    assert len(msgs) == 1 and "'c0-1'" in msgs[0] and "'c0'" in msgs[0], msgs


@pytest.mark.parametrize("preshuffle", [False, True])
def test_samples_sharing_barcodes_are_told_apart_by_id_prefix(tmp_path, preshuffle):
    """Two 10x samples reuse the same barcodes: refused with the way out, then built with id_prefix; the
    RNA and ATAC sides of each sample still pair on their own ids."""
    s1, s2 = _pair(seed=1), _pair(seed=2)  # the same ids c0..c5
    s2[1]._inplace_subset_obs(s2[1].obs_names[2:])  # sample 2: c0, c1 RNA-only
    in1, in2 = _write_pair(tmp_path, *s1, name="s1"), _write_pair(tmp_path, *s2, name="s2")
    with pytest.raises(ValidationError, match=r"cell id 'c0' appears more than once .*inputs\[i\]\.id_prefix"):
        _build(tmp_path, [in1, in2], preshuffle=preshuffle)
    in1.id_prefix, in2.id_prefix = "s1_", "s2_"
    st = _build(tmp_path, [in1, in2], preshuffle=preshuffle)
    obs = st.read_obs()
    assert sorted(obs.index) == sorted([f"s{k}_c{i}" for k in (1, 2) for i in range(6)])
    assert set(obs.index[~obs["mask_atac"].to_numpy(bool)]) == {"s2_c0", "s2_c1"}
    mats = {mod: sp.vstack([st.read_rows(mod, i, 0, st.meta.shard_offsets[i + 1] - st.meta.shard_offsets[i])
                           for i in range(st.meta.n_shards)], format="csr").toarray() for mod in ("rna", "atac")}
    row = {c: i for i, c in enumerate(obs.index)}
    for k, (r, a) in ((1, s1), (2, s2)):
        for j, cid in enumerate(r.obs_names):
            np.testing.assert_array_equal(mats["rna"][row[f"s{k}_{cid}"]], r.X[j].toarray().ravel())
        for j, cid in enumerate(a.obs_names):
            np.testing.assert_array_equal(mats["atac"][row[f"s{k}_{cid}"]], a.X[j].toarray().ravel())


def test_a_wrong_n_genes_that_puts_regions_among_the_genes_is_refused():
    """kind=scvi without a modality column splits at n_genes: one too many made the first peak a gene, without
    a word. Where the peaks are named as regions, a region-named column on the genes' side is refused."""
    from data.convert.base import _split_columns

    var = pd.DataFrame(index=[f"g{i}" for i in range(5)] + [f"chr1-{i * 100}-{i * 100 + 50}" for i in range(1, 6)])
    genes, peaks = _split_columns(var, None, 5, "x.h5ad")
    assert list(genes) == [0, 1, 2, 3, 4] and list(peaks) == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match=r"x\.h5ad: n_genes=7 puts 'chr1-100-150' \(column 5\), named like a region"):
        _split_columns(var, None, 7, "x.h5ad")
    other = pd.DataFrame(index=["HLA-A", "MT-ND1", "RP11-34P13.3", "g", "chrX:10-20", "chr2_5_9", "KI270727.1:1-9"])
    assert len(_split_columns(other, None, 4, "y")[0]) == 4  # gene names with dashes and odd contigs pass


def test_a_store_of_one_modality_s_features_is_built_with_a_warning(tmp_path, caplog):
    """An RNA-only input without features_from builds a store of 0 regions, which mva-train refuses only when it
    starts (and mva-infer for any model): the build says so, and what to do for one-modality data."""
    rna, _ = _pair()
    rna.write_h5ad(tmp_path / "rna.h5ad")
    with caplog.at_level(logging.WARNING, logger="mva-build"):
        st = _build(tmp_path, [InputConfig(kind="h5ad_pair", rna=str(tmp_path / "rna.h5ad"))])
    assert st.meta.n_regions == 0 and st.meta.n_genes == 4
    assert "the store gets 0 regions (no input measures ATAC)" in caplog.text and "features_from=" in caplog.text
