"""Store writer + reader: round trip through real Zarr v3 shards, validity markers, ordinary tools.

Run: .venv/bin/python -m pytest tests/test_store.py -q
"""

from __future__ import annotations

import json

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data.split import cell_hash
from data.store import StoreError, open_store
from data.store_format import StoreSchema
from data.writer import StoreExistsError, StoreWriter


def _random_cells(n=700, G=40, R=90, seed=0):
    rng = np.random.default_rng(seed)
    mr = rng.random(n) < 0.7
    ma = ~mr | (rng.random(n) < 0.5)
    rna = sp.random(n, G, 0.3, format="csr", random_state=seed, dtype=np.float64)
    rna.data = np.ceil(rna.data * 900).astype(np.float64)  # counts up to 900: needs uint16
    atac = sp.random(n, R, 0.05, format="csr", random_state=seed + 1)
    atac.data = np.ceil(atac.data * 3)
    rna = sp.csr_matrix(sp.diags_array(mr.astype(np.float64)) @ rna).astype(np.int32)
    atac = sp.csr_matrix(sp.diags_array(ma.astype(np.float64)) @ atac).astype(np.int32)
    rna.eliminate_zeros()
    atac.eliminate_zeros()
    obs = pd.DataFrame({"donor": rng.choice(["d1", "d2", "d3"], n), "ct": rng.choice(["T", "B"], n),
                        "age": rng.normal(50, 10, n), "mask_rna": mr, "mask_atac": ma},
                       index=[f"cell{i}" for i in range(n)])
    schema = StoreSchema(gene_names=[f"G{i}" for i in range(G)],
                         region_names=[f"chr2-{i * 1000}-{i * 1000 + 400}" for i in range(R)],
                         batch_key="donor", batch_categories=["d1", "d2", "d3"], cont_cov_keys=["age"],
                         label_key="ct", label_categories=["B", "T"])
    return rna, atac, obs, schema


def _write(path, rna, atac, obs, schema, shard_size, block=97, **kw):
    with StoreWriter(path, schema, shard_size=shard_size, **kw) as w:
        for s in range(0, len(obs), block):
            w.append(rna[s:s + block], atac[s:s + block], obs.iloc[s:s + block])
    return open_store(path)


@pytest.mark.parametrize("shard_size", [128, 700, 10_000])
def test_round_trip_every_count_id_and_column(tmp_path, shard_size):
    rna, atac, obs, schema = _random_cells()
    st = _write(tmp_path / "s.zarr", rna, atac, obs, schema, shard_size)
    m = st.meta
    assert (m.n_cells, m.n_genes, m.n_regions) == (700, 40, 90)
    assert m.shard_offsets == sorted(set(list(range(0, 700, shard_size)) + [700]))
    got = st.read_obs()
    assert list(got.index) == list(obs.index)
    assert got["donor"].dtype == "category" and list(got["donor"].cat.categories) == ["d1", "d2", "d3"]
    np.testing.assert_array_equal(got["mask_rna"].values, obs["mask_rna"].values)
    np.testing.assert_array_equal(got["split_hash"].values, cell_hash(obs.index))
    np.testing.assert_array_equal(got["cell_index"].values, np.arange(700))
    np.testing.assert_array_equal(got["lib_rna"].values, np.asarray(rna.sum(1)).ravel())
    assert got["age"].dtype == np.float32
    for name, x in (("rna", rna), ("atac", atac)):
        blocks = [st.read_rows(name, i, 0, m.shard_offsets[i + 1] - m.shard_offsets[i]) for i in range(m.n_shards)]
        back = sp.vstack(blocks, format="csr")
        assert (back != x).nnz == 0
        assert back.dtype.kind == "u"
    assert st.read_rows("rna", 0, 0, 1).dtype == np.uint16  # max count 900 -> uint16
    assert st.meta.region_names[1] == "chr2-1000-1400"
    assert list(st.features["atac"].columns[:3]) == ["chrom", "start", "end"]


def test_stats_match_a_direct_computation(tmp_path):
    rna, atac, obs, schema = _random_cells()
    st = _write(tmp_path / "s.zarr", rna, atac, obs, schema, 200)
    stats = st.read_stats()
    lib = np.asarray(rna.sum(1)).ravel()
    for b, name in enumerate(["d1", "d2", "d3"]):
        sel = obs["mask_rna"].values & (obs["donor"].values == name)
        ll = np.log(lib[sel])
        assert stats["rna_library_log_mean"][b] == pytest.approx(ll.mean(), rel=1e-5)
        assert stats["rna_library_log_var"][b] == pytest.approx(ll.var(), rel=1e-3)
    det = (atac[obs["mask_atac"].values] > 0).mean(0).A1
    np.testing.assert_allclose(stats["atac_detection_rate"], det, rtol=1e-6)


def test_shards_open_with_mudata_anndata_and_zarr(tmp_path):
    rna, atac, obs, schema = _random_cells()
    _write(tmp_path / "s.zarr", rna, atac, obs, schema, 300)
    md = mudata.read_zarr(str(tmp_path / "s.zarr/shards/00001"))
    assert md.n_obs == 300 and set(md.mod) == {"rna", "atac"}
    assert (md.mod["rna"].X != rna[300:600]).nnz == 0
    a = ad.read_zarr(tmp_path / "s.zarr/shards/00002/mod/atac")
    assert a.shape == (100, 90) and (a.X != atac[600:]).nnz == 0
    meta = json.loads((tmp_path / "s.zarr/zarr.json").read_text())["attributes"]
    assert meta["complete"] is True and meta["format"] == "multivi-atlas-store"


def test_refuses_existing_output_and_overwrites_when_asked(tmp_path):
    rna, atac, obs, schema = _random_cells(n=50)
    _write(tmp_path / "s.zarr", rna, atac, obs, schema, 64)
    with pytest.raises(StoreExistsError, match="overwrite"):
        StoreWriter(tmp_path / "s.zarr", schema)
    st = _write(tmp_path / "s.zarr", rna[:20], atac[:20], obs.iloc[:20], schema, 64, overwrite=True)
    assert st.meta.n_cells == 20


def test_interrupted_write_leaves_nothing_valid(tmp_path):
    rna, atac, obs, schema = _random_cells()
    with pytest.raises(RuntimeError, match="boom"), StoreWriter(tmp_path / "s.zarr", schema, shard_size=100) as w:
        w.append(rna[:300], atac[:300], obs.iloc[:300])  # three shards already on disk
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # Without the context manager (a kill): the .tmp- directory stays, and it is refused.
    w = StoreWriter(tmp_path / "s.zarr", schema, shard_size=100)
    w.append(rna[:300], atac[:300], obs.iloc[:300])
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(StoreError, match="temporary"):
        open_store(w.tmp)
    with pytest.raises(StoreError, match="zarr.json"):
        open_store(tmp_path / "s.zarr")


def test_open_store_names_the_problem(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "x"), mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="'format'"):
        open_store(tmp_path / "x")
    g.attrs.update({"format": "multivi-atlas-store", "schema_version": 99})
    with pytest.raises(StoreError, match="schema_version 99"):
        open_store(tmp_path / "x")
    g.attrs.update({"schema_version": 1, "complete": False})
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "x")


def test_writer_rejects_counts_in_an_unmeasured_modality(tmp_path):
    rna, atac, obs, schema = _random_cells(n=30)
    obs = obs.copy()
    obs.iloc[3, obs.columns.get_loc("mask_rna")] = False
    rna = rna.tolil()
    rna[3, 0] = 5
    with pytest.raises(ValueError, match="cell3.*mask_rna is False"), StoreWriter(tmp_path / "s.zarr", schema) as w:
        w.append(rna.tocsr(), atac, obs)
    assert list(tmp_path.iterdir()) == []


def test_preshuffled_is_recorded_only_when_the_writer_is_told(tmp_path):
    """``preshuffled`` (docs/store.md) is what the loader's chunking default trusts: the writer records
    the caller's word (False unless told), mva-synth always says True (its cells are drawn i.i.d.)."""
    from data.synthetic import write_synthetic_store

    rna, atac, obs, schema = _random_cells(n=200)
    plain = _write(tmp_path / "plain.zarr", rna, atac, obs, schema, 128)
    shuffled = _write(tmp_path / "shuffled.zarr", rna, atac, obs, schema, 128, preshuffled=True)
    synth = open_store(write_synthetic_store(tmp_path / "synth.zarr", n_cells=300, n_genes=20, n_regions=40,
                                             progress=False))
    assert plain.root.attrs["preshuffled"] is False
    assert shuffled.root.attrs["preshuffled"] is True
    assert synth.root.attrs["preshuffled"] is True
    meta = json.loads((tmp_path / "shuffled.zarr" / "zarr.json").read_text())["attributes"]
    assert meta["preshuffled"] is True and meta["complete"] is True  # plain zarr metadata, no code needed


def test_an_output_that_appears_during_the_write_is_not_replaced(tmp_path):
    # overwrite=false was checked only when the writer started: a second build to the same output, finishing
    # later, moved the first one's finished store aside and deleted it
    rna, atac, obs, schema = _random_cells(n=50)
    late = StoreWriter(tmp_path / "s.zarr", schema, shard_size=64)
    late.append(rna[:10], atac[:10], obs.iloc[:10])
    first = _write(tmp_path / "s.zarr", rna, atac, obs, schema, 64)
    with pytest.raises(StoreExistsError, match="appeared while"), late:
        pass
    assert open_store(tmp_path / "s.zarr").meta.n_cells == first.meta.n_cells == 50
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]
