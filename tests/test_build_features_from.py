"""mva-build features_from: a new store takes a trained model's (or a store's) features exactly, so that the
model reads it (the reference's ``MULTIVI.prepare_query_mudata``, done while the store is written).

    .venv/bin/python -m pytest tests/test_build_features_from.py -q

Inputs whose genes and peaks come in another order, with some missing and some extra: the store has the
model's names in the model's order, every input count at its feature's new column, zero columns for the
absent ones, and the model's embedding of the cells is the one it gives them from a store in its own order.
"""

from __future__ import annotations

import logging
import subprocess
import sys

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
from tests.test_build_inputs import _pair, _write_pair
from tests.train_utils import PY, ROOT, env, tiny_config


def _query(ref_rna, ref_atac, n=5, seed=1):
    """Genes and peaks of the reference in another order, two of each missing, one unknown of each added."""
    genes = [ref_rna.var_names[i] for i in (3, 1, 0, 5)] + ["gX"]
    peaks = [ref_atac.var_names[i] for i in (4, 2, 0)] + ["chr9:1-2"]
    rng = np.random.default_rng(seed)
    o = pd.DataFrame({"batch": ["b0"] * n}, index=[f"q{i}" for i in range(n)])
    rna = ad.AnnData(sp.csr_matrix(rng.poisson(2, (n, len(genes))).astype(np.int32) + 1), obs=o.copy(),
                     var=pd.DataFrame({"gene_id": [f"id_{g}" for g in genes]}, index=genes))
    atac = ad.AnnData(sp.csr_matrix(rng.poisson(2, (n, len(peaks))).astype(np.int32) + 1), obs=o.copy(),
                      var=pd.DataFrame(index=peaks))
    return rna, atac


def _expected(x: ad.AnnData, names) -> np.ndarray:
    """``x``'s counts moved to the columns ``names`` (zeros where x lacks the name)."""
    out = np.zeros((x.n_obs, len(names)), dtype=np.int64)
    pos = pd.Index(names).get_indexer(x.var_names)
    out[:, pos[pos >= 0]] = x.X.toarray()[:, pos >= 0]
    return out


@pytest.mark.parametrize("mode", [{}, {"preshuffle": True}, {"dask_scheduler": "local", "shard_size": 2}])
def test_the_store_takes_the_reference_features_in_order_with_zero_columns(tmp_path, caplog, mode):
    rna, atac = _pair(n=6, g=6, r=5)
    ref = build_store(BuildConfig(out=str(tmp_path / "ref.zarr"), progress=False,
                                  inputs=[_write_pair(tmp_path, rna, atac, "ref")]))
    qrna, qatac = _query(rna, atac)
    with caplog.at_level(logging.INFO, logger="mva-build"):
        out = build_store(BuildConfig(out=str(tmp_path / "q.zarr"), progress=False, features_from=str(ref),
                                      inputs=[_write_pair(tmp_path, qrna, qatac, "q")], **mode))
    st = open_store(out)
    assert list(st.meta.gene_names) == list(rna.var_names)
    assert list(st.meta.region_names) == list(atac.var_names)
    pos = pd.Index(qrna.obs_names).get_indexer(st.read_obs().index)
    for m, x, names in (("rna", qrna, rna.var_names), ("atac", qatac, atac.var_names)):
        off = st.meta.shard_offsets
        got = np.vstack([st.read_rows(m, s, 0, off[s + 1] - off[s]).toarray() for s in range(st.meta.n_shards)])
        np.testing.assert_array_equal(got, _expected(x, names)[pos])
    src = st.meta.source
    (where,) = src["dropped_features"]["rna"]
    assert src["padded_features"] == {"rna": {where: {"n": 2, "first": ["g2", "g4"]}},
                                      "atac": {where: {"n": 2, "first": [atac.var_names[1], atac.var_names[3]]}}}
    assert [v["first"] for v in src["dropped_features"]["rna"].values()] == [["gX"]]
    # a feature-table column travels to the new positions, missing where the input lacks the feature
    gene_id = st.features["rna"]["gene_id"]
    assert gene_id["g3"] == "id_g3" and pd.isna(gene_id["g2"])
    # 4 of 6 genes and 3 of 5 peaks: under scvi-tools' 80 % share, warned for both
    text = caplog.text
    assert "has 4 of features_from's 6 rna features (66.7 %" in text and "3 of features_from's 5 atac features" in text


def test_an_rna_only_query_lists_every_peak_of_the_model(tmp_path, caplog):
    rna, atac = _pair(n=6, g=6, r=5)
    ref = build_store(BuildConfig(out=str(tmp_path / "ref.zarr"), progress=False,
                                  inputs=[_write_pair(tmp_path, rna, atac, "ref")]))
    qrna, _ = _query(rna, atac)
    (tmp_path / "r").mkdir()
    qrna.write_h5ad(tmp_path / "r" / "rna.h5ad")
    with caplog.at_level(logging.INFO, logger="mva-build"):
        st = open_store(build_store(BuildConfig(out=str(tmp_path / "q.zarr"), progress=False, features_from=str(ref),
                                                inputs=[InputConfig(kind="h5ad_pair", rna=str(tmp_path / "r" / "rna.h5ad"))])))
    assert list(st.meta.region_names) == list(atac.var_names)
    assert not st.read_obs()["mask_atac"].any()
    assert "no input measures atac: the store lists features_from's 5 atac features" in caplog.text


def test_bad_features_from_is_refused_by_name_before_inputs_are_read(tmp_path):
    rna, atac = _pair(n=6, g=6, r=5)
    inp = _write_pair(tmp_path, rna, atac, "x")
    with pytest.raises(ValidationError, match=r"features_from: .*nope does not exist"):
        build_store(BuildConfig(out=str(tmp_path / "a.zarr"), progress=False, features_from=str(tmp_path / "nope"),
                                inputs=[InputConfig(kind="h5ad_pair", rna=str(tmp_path / "missing.h5ad"))]))
    (tmp_path / "scvi").mkdir()
    (tmp_path / "scvi" / "model.pt").write_bytes(b"")
    with pytest.raises(ValidationError, match=r"scvi-tools model .*export.direction=from_scvi"):
        build_store(BuildConfig(out=str(tmp_path / "a.zarr"), progress=False, features_from=str(tmp_path / "scvi"),
                                inputs=[inp]))
    with pytest.raises(ValidationError, match=r"neither a model directory .* nor a store"):
        build_store(BuildConfig(out=str(tmp_path / "a.zarr"), progress=False, features_from=str(tmp_path / "x"),
                                inputs=[inp]))
    with pytest.raises(ConfigError, match="min_gene_fraction and min_region_fraction must stay 0"):
        BuildConfig(out=str(tmp_path / "a.zarr"), features_from=str(tmp_path), min_gene_fraction=0.1)
    ref = build_store(BuildConfig(out=str(tmp_path / "ref.zarr"), progress=False, inputs=[inp]))
    other = rna.copy()
    other.var_names = [f"ENSG{i}" for i in range(other.n_vars)]
    with pytest.raises(ValidationError, match=r"none of its 6 rna features is among the 6 of features_from"):
        build_store(BuildConfig(out=str(tmp_path / "b.zarr"), progress=False, features_from=str(ref),
                                inputs=[_write_pair(tmp_path, other, atac, "y")]))
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from data.synthetic import write_synthetic_store
    from trainer.train import train

    root = tmp_path_factory.mktemp("features_from")
    store = write_synthetic_store(root / "store", n_cells=200, n_genes=60, n_regions=150, progress=False)
    return store, train(tiny_config(store, root / "run")).run_dir


def test_a_model_embeds_cells_given_in_another_feature_order_as_in_its_own(trained, tmp_path):
    """The cells of the training store, written as an .h5mu with genes and peaks shuffled, rebuilt with the
    CLI's features_from=<run dir>: mva-infer accepts the store and the embedding equals the original's."""
    import mudata

    from trainer.infer import infer
    from trainer.infer_config import InferConfig
    from trainer.jobs.common import InferError

    store, run = trained
    md = mudata.read_zarr(open_store(store).shard_path(0))
    rng = np.random.default_rng(0)
    for m in ("rna", "atac"):
        md.mod[m] = md.mod[m][:, rng.permutation(md.mod[m].n_vars)].copy()
    md.update()
    md.write(tmp_path / "shuffled.h5mu")
    plain = build_store(BuildConfig(out=str(tmp_path / "plain.zarr"), progress=False,
                                    inputs=[InputConfig(kind="h5mu", path=str(tmp_path / "shuffled.h5mu"))]))
    with pytest.raises(InferError, match=r"the same names in another order.*features_from=<this model>"):
        infer(InferConfig(model_dir=str(run), store=str(plain), output=str(tmp_path / "no.zarr"), progress=False))
    res = subprocess.run([PY, "-m", "data.build", f"out={tmp_path / 'q.zarr'}", f"features_from={run}",
                          "progress=false", f"inputs=[{{kind: h5mu, path: {tmp_path / 'shuffled.h5mu'}}}]"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    embs = {}
    for name, s in (("own", store), ("rebuilt", tmp_path / "q.zarr")):
        infer(InferConfig(model_dir=str(run), store=str(s), output=str(tmp_path / f"{name}.zarr"), batch_size=64,
                          progress=False, modalities=["joint"]))
        a = ad.read_zarr(str(tmp_path / f"{name}.zarr"))
        embs[name] = pd.DataFrame(np.asarray(a.obsm["X_multivi"]), index=a.obs_names)
    assert len(embs["rebuilt"]) == 200
    np.testing.assert_allclose(embs["rebuilt"].loc[embs["own"].index].to_numpy(), embs["own"].to_numpy(),
                               rtol=0, atol=1e-6)


def test_the_cli_refuses_features_from_with_a_filter_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "data.build", f"out={tmp_path / 'a.zarr'}", f"features_from={tmp_path}",
                          "min_region_fraction=0.01", "inputs=[{kind: h5mu, path: x.h5mu}]"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and "features_from writes exactly the model's features" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_each_input_s_missing_features_are_its_own_zero_columns(tmp_path, caplog):
    """Two inputs, one with every gene and one lacking two: the second's cells get zeros there, reported for
    that input (an input-level padding, as scvi-tools pads each AnnData), the first's keep their counts."""
    rna, atac = _pair(n=6, g=6, r=5)
    ref = build_store(BuildConfig(out=str(tmp_path / "ref.zarr"), progress=False,
                                  inputs=[_write_pair(tmp_path, rna, atac, "ref")]))
    full_rna, full_atac = _pair(n=4, g=6, r=5, seed=3, prefix="a")
    part_rna, part_atac = _query(rna, atac, n=3)
    a, b = _write_pair(tmp_path, full_rna, full_atac, "a"), _write_pair(tmp_path, part_rna, part_atac, "b")
    with caplog.at_level(logging.INFO, logger="mva-build"):
        st = open_store(build_store(BuildConfig(out=str(tmp_path / "q.zarr"), progress=False, features_from=str(ref),
                                                feature_join="intersection", inputs=[a, b])))
    padded = st.meta.source["padded_features"]["rna"]
    assert [v["n"] for v in padded.values()] == [0, 2] and list(padded.values())[1]["first"] == ["g2", "g4"]
    x = st.read_rows("rna", 0, 0, 7).toarray()
    order = list(st.read_obs().index)
    np.testing.assert_array_equal(x[[order.index(c) for c in full_rna.obs_names]], full_rna.X.toarray())
    np.testing.assert_array_equal(x[[order.index(c) for c in part_rna.obs_names]], _expected(part_rna, rna.var_names))
    assert "b/rna.h5ad + " in caplog.text and "has 4 of features_from's 6 rna features" in caplog.text
