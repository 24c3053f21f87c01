"""StoreStream on real stores on disk: exactly once, contents, determinism, resume, splits, inference.

Run: .venv/bin/python -m pytest tests/test_stream.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data import keys
from data.collate import to_device
from data.store import open_store
from data.stream import StoreStream
from data.synthetic import write_synthetic_store

N_CELLS = 2500


def _store(root, shard_size):
    return write_synthetic_store(root / f"s{shard_size}.zarr", n_cells=N_CELLS, n_genes=60, n_regions=300, seed=4,
                                 shard_size=shard_size, block_size=1000, with_covariates=True, progress=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {s: _store(root, s) for s in (700, 1024)}


def _indices(stream, **dl):
    if dl:
        stream = DataLoader(stream, batch_size=None, **dl)
    return [b[keys.INDEX].numpy() for b in stream]


@pytest.mark.parametrize("shard_size", [700, 1024])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_cells_exactly_once_equal_counts(stores, shard_size, world_size):
    per_rank = [_indices(StoreStream(stores[shard_size], 50, seed=2, rank=r, world_size=world_size, chunk_size=64,
                                     window_chunks=4)) for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1, "ranks must yield the same number of batches"
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    s = StoreStream(stores[shard_size], 50, seed=2, world_size=world_size, chunk_size=64, window_chunks=4)
    train = np.flatnonzero(s.eligible)
    assert len(seen) == len(np.unique(seen)), "a cell was yielded twice"
    assert np.isin(seen, train).all()
    assert len(seen) + s.plan().n_dropped == len(train)
    assert s.plan().n_dropped < 50 * world_size


def test_batch_contents_match_the_store(stores):
    path = stores[700]
    st = open_store(path)
    obs = st.read_obs()
    b = next(iter(StoreStream(path, 40, seed=0, size_factor=True)))
    idx = b[keys.INDEX].numpy()
    assert b[keys.RNA].layout == torch.sparse_csr and b[keys.RNA].shape == (40, 60)
    for mod, col in ((keys.RNA, 0), (keys.ATAC, 1)):
        want = []
        for i in idx:
            sh = st.meta.shard_of(int(i))
            lo = int(i) - st.meta.shard_offsets[sh]
            want.append(st.read_rows(mod, sh, lo, lo + 1).toarray())
        assert np.array_equal(np.vstack(want), b[mod].to_dense().numpy())
        assert np.array_equal(b[keys.MASK][:, col].numpy(), obs[f"mask_{mod}"].values[idx])
    assert np.array_equal(b[keys.BATCH].numpy(), obs["batch"].cat.codes.values[idx])
    assert np.array_equal(b[keys.CAT_COVS][:, 0].numpy(), obs["site"].cat.codes.values[idx])
    assert np.allclose(b[keys.CONT_COVS][:, 0].numpy(), obs["pct_mito"].values[idx])
    assert np.array_equal(b[keys.LABEL].numpy(), obs["cell_type"].cat.codes.values[idx])
    assert np.array_equal(b[keys.SIZE_FACTOR][:, 0].numpy()[obs["mask_rna"].values[idx]],
                          obs["lib_rna"].values[idx][obs["mask_rna"].values[idx]].astype(np.float32))
    dense = to_device(b, "cpu", dense=True)
    assert dense[keys.ATAC].layout == torch.strided
    assert torch.equal(dense[keys.ATAC], b[keys.ATAC].to_dense())


def test_every_batch_of_an_epoch_matches_the_store(stores):
    """Grouped gathers (several batches per read round and per gather, handed out as views) give exactly
    the store's rows and columns for every batch, across shard and inner-chunk boundaries."""
    path = stores[700]
    st = open_store(path)
    obs = st.read_obs()
    whole = {m: np.vstack([st.read_rows(m, s, 0, st.meta.shard_offsets[s + 1] - st.meta.shard_offsets[s]).toarray()
                           for s in range(st.meta.n_shards)]) for m in (keys.RNA, keys.ATAC)}
    stream = StoreStream(path, 16, seed=5, chunk_size=64, window_chunks=4, size_factor=True)
    batches = list(stream)
    plan = stream.plan()
    assert len(batches) == len(plan) > 8
    for b, want in zip(batches, plan.batches, strict=True):
        idx = b[keys.INDEX].numpy()
        assert np.array_equal(idx, want)
        for m in (keys.RNA, keys.ATAC):
            assert b[m].crow_indices()[0] == 0 and b[m].shape == (len(want), whole[m].shape[1])
            assert np.array_equal(b[m].to_dense().numpy(), whole[m][idx])
        assert np.array_equal(b[keys.MASK].numpy(), obs[["mask_rna", "mask_atac"]].values[idx])
        assert np.array_equal(b[keys.BATCH].numpy(), obs["batch"].cat.codes.values[idx])
        assert np.array_equal(b[keys.LABEL].numpy(), obs["cell_type"].cat.codes.values[idx])
        assert np.allclose(b[keys.CONT_COVS][:, 0].numpy(), obs["pct_mito"].values[idx])
        one = stream.make_batch(want)  # the one-batch path gives the same tensors
        for k, v in one.items():
            got = b[k].to_dense() if v.layout == torch.sparse_csr else b[k]
            assert torch.equal(got, v.to_dense() if v.layout == torch.sparse_csr else v), k


def test_deterministic_and_reshuffled_per_epoch(stores):
    a = StoreStream(stores[700], 64, seed=7)
    b = StoreStream(stores[700], 64, seed=7)
    first = _indices(a)
    assert all(np.array_equal(x, y) for x, y in zip(first, _indices(b), strict=True))
    a.set_epoch(1)
    second = _indices(a)
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))


def test_dataloader_workers_reproduce_the_single_process_sequence(stores):
    ref = _indices(StoreStream(stores[700], 64, seed=1, rank=1, world_size=2))
    got = _indices(StoreStream(stores[700], 64, seed=1, rank=1, world_size=2), num_workers=2)
    assert len(ref) == len(got) and all(np.array_equal(x, y) for x, y in zip(ref, got))


def test_resume_mid_epoch_yields_the_uninterrupted_rest(stores):
    full = StoreStream(stores[700], 48, seed=3, rank=0, world_size=2)
    full.set_epoch(2)
    want = list(full)
    part = StoreStream(stores[700], 48, seed=3, rank=0, world_size=2)
    part.set_epoch(2)
    it = iter(part)
    for _ in range(5):
        next(it)
    state = part.state_dict()
    assert state["batches_consumed"] == 5 and state["epoch"] == 2
    it.close()
    resumed = StoreStream(stores[700], 48, seed=3, rank=0, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a trainer's epoch loop does: must keep the resume position
    rest = list(resumed)
    assert len(rest) == len(want) - 5
    for x, y in zip(want[5:], rest, strict=True):
        for k in (keys.INDEX, keys.BATCH, keys.MASK):
            assert torch.equal(x[k], y[k])
        assert torch.equal(x[keys.ATAC].to_dense(), y[keys.ATAC].to_dense())
    # Through DataLoader workers the trainer passes the count it consumed.
    resumed.load_state_dict(part.state_dict(batches_consumed=7))
    got = _indices(resumed, num_workers=2)
    assert all(np.array_equal(x[keys.INDEX].numpy(), y) for x, y in zip(want[7:], got, strict=True))


def test_chunking_follows_the_stores_preshuffled_attribute(stores, tmp_path):
    """A preshuffled store (mva-synth) defaults to 1,024-row chunks x 4 per window; a store without the
    attribute keeps 256 x 16 (the same 4,096-row window); a caller's value always wins."""
    synth = stores[700]
    assert open_store(synth).root.attrs["preshuffled"] is True
    assert (StoreStream(synth, 32).chunk_size, StoreStream(synth, 32).window_chunks) == (1024, 4)
    assert (StoreStream(synth, 32, chunk_size=64).chunk_size, StoreStream(synth, 32, chunk_size=64).window_chunks) \
        == (64, 16)
    assert StoreStream(synth, 32, window_chunks=8).chunk_size == 256
    # An older store: the same cells with the attribute removed (stores written before it existed).
    import shutil

    import zarr

    old = tmp_path / "old.zarr"
    shutil.copytree(synth, old)
    root = zarr.open_group(str(old), mode="r+")
    attrs = dict(root.attrs)
    del attrs["preshuffled"]
    root.attrs.clear()
    root.attrs.update(attrs)
    s = StoreStream(old, 32)
    assert (s.chunk_size, s.window_chunks) == (256, 16)
    # The chunking decides the epoch's order: a resume state from another chunking is refused.
    with pytest.raises(ValueError, match="chunk_size=1024 but this stream has chunk_size=256"):
        s.load_state_dict(StoreStream(synth, 32).state_dict())
    state = StoreStream(synth, 32).state_dict()
    for k in ("chunk_size", "window_chunks"):  # a state saved before they were recorded still loads
        state.pop(k)
    StoreStream(synth, 32).load_state_dict(state)


def test_state_from_another_world_size_is_refused(stores):
    state = StoreStream(stores[700], 32, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2.*world_size=3"):
        StoreStream(stores[700], 32, world_size=3).load_state_dict(state)


def test_split_stable_under_shard_layout_and_disjoint(stores):
    def cells(path, split):
        return set(np.flatnonzero(StoreStream(path, 8, split=split, val_fraction=0.2).eligible).tolist())

    train_a, train_b = cells(stores[700], "train"), cells(stores[1024], "train")
    val = cells(stores[700], "validation")
    assert train_a == train_b and val == cells(stores[1024], "validation")
    assert not train_a & val and len(train_a | val) == N_CELLS and 0 < len(val) < N_CELLS


def test_validation_every_cell_once_across_ranks(stores):
    per_rank = [np.concatenate(_indices(StoreStream(stores[700], 64, split="validation", shuffle=False,
                                                    val_fraction=0.2, rank=r, world_size=3))) for r in range(3)]
    want = np.flatnonzero(StoreStream(stores[700], 64, split="validation", val_fraction=0.2).eligible)
    assert np.array_equal(np.concatenate(per_rank), want)


def test_inference_mode_covers_every_cell_in_store_order(stores):
    blocks = []
    for r in range(3):
        s = StoreStream(stores[1024], 100, split="all", shuffle=False, rank=r, world_size=3)
        idx = np.concatenate(_indices(s))
        assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))), "rank block must be contiguous"
        blocks.append(idx)
    assert np.array_equal(np.concatenate(blocks), np.arange(N_CELLS))


def test_bad_arguments(stores):
    with pytest.raises(ValueError, match="split must be one of"):
        StoreStream(stores[700], 8, split="test")
    with pytest.raises(ValueError, match="fewer than world_size x batch_size"):
        StoreStream(stores[700], 5000, remainder="drop")
    with pytest.raises(ValueError, match="fewer than 2 per rank"):  # even takes any batch size, not 1 cell per rank
        StoreStream(stores[700], 5000, world_size=N_CELLS, rank=3)
    # no training cell at all: it said "use remainder='pad'" even to a stream that used it
    with pytest.raises(ValueError, match=r"has no cells .*lower data\.val_fraction"):
        StoreStream(stores[700], 8, val_fraction=0.9999999, remainder="pad")


def test_a_window_larger_than_the_store_reserves_only_the_store_s_chunks(stores):
    # the reader's pool is preallocated: 2 x window_chunks + 2 slots asked for 36 GiB on a 400-cell store
    s = StoreStream(stores[700], 64, chunk_size=100_000, window_chunks=100_000)
    want = sum(len(b) for b in s.plan().batches)
    assert want > 0 and sum(b["batch"].shape[0] for b in s) == want


def test_state_from_another_split_or_store_is_refused(stores, tmp_path):
    """A resume position only means "the rest of that epoch" on the same cells: a state saved with
    another val_fraction (another training set) or on a store with other cells used to load silently."""
    state = StoreStream(stores[700], 32, val_fraction=0.1).state_dict(batches_consumed=10)
    with pytest.raises(ValueError, match="val_fraction=0.1 but this stream has val_fraction=0.3"):
        StoreStream(stores[700], 32, val_fraction=0.3).load_state_dict(state)
    other = write_synthetic_store(tmp_path / "other.zarr", n_cells=N_CELLS - 300, n_genes=60, n_regions=300, seed=4,
                                  shard_size=700, block_size=1000, with_covariates=True, progress=False)
    with pytest.raises(ValueError, match=f"n_cells={N_CELLS} but this stream has n_cells={N_CELLS - 300}"):
        StoreStream(other, 32, chunk_size=state["chunk_size"], window_chunks=state["window_chunks"]).load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("val_fraction", "n_cells")}  # saved before they were recorded
    with pytest.raises(ValueError, match="epoch has .* batches but this stream's has"):
        StoreStream(stores[700], 32, val_fraction=0.3).load_state_dict(old)
    StoreStream(stores[700], 32, val_fraction=0.1).load_state_dict(old)


def test_state_from_before_the_store_was_rebuilt_in_place_is_refused(tmp_path):
    """Same cell count and batch count, another shard layout (so another epoch order): the state loaded
    and "the rest of the epoch" was other cells (some twice, some never)."""
    def build(**kw):
        opts = {"n_cells": 500, "n_genes": 20, "n_regions": 40, "seed": 4, "shard_size": 200, **kw}
        return write_synthetic_store(tmp_path / "s.zarr", progress=False, overwrite=True, **opts)

    path = build()
    state = StoreStream(path, 32, chunk_size=16).state_dict(batches_consumed=5)
    build()  # rebuilt identically: the same rows, the resume stands
    StoreStream(path, 32, chunk_size=16).load_state_dict(state)
    build(shard_size=150)
    with pytest.raises(ValueError, match="rows_fingerprint=.*the rest of that epoch would not be the same cells"):
        StoreStream(path, 32, chunk_size=16).load_state_dict(state)


def test_a_store_rebuilt_in_place_while_read_is_an_error_not_garbage_rows(tmp_path):
    """zarr opens files by path: a stream holding the old indptrs and cell table gathered the new store's
    arrays into wrong rows without an error (most rows of an epoch, in a probe), and a loader worker started after
    the rebuild reopened the new store under the parent's plan."""
    import pickle

    from data.store import StoreError

    def build(seed):
        return write_synthetic_store(tmp_path / "s.zarr", n_cells=1200, n_genes=20, n_regions=40, seed=seed,
                                     shard_size=600, progress=False, overwrite=True)

    path = build(1)
    s = StoreStream(path, 100, split="all", chunk_size=64, window_chunks=2, prefetch=0)
    it = iter(s)
    next(it)
    worker_copy = pickle.dumps(s)  # what a spawned DataLoader worker receives
    build(2)
    with pytest.raises(StoreError, match="was replaced while it was being read"):
        list(it)
    with pytest.raises(StoreError, match="was replaced while it was being read"):
        list(pickle.loads(worker_copy))
    assert len(list(StoreStream(path, 100, split="all", prefetch=0))) == 12  # a fresh stream reads it


def test_clear_resume_after_workers_start_keeps_later_passes_whole(stores):
    """With DataLoader workers __iter__ (which consumes the resume position) runs in the workers' copies:
    clear_resume() in the parent makes the next pass of the same epoch a whole one again."""
    s = StoreStream(stores[700], 64, prefetch=0)
    n = len(s)
    s.load_state_dict(s.state_dict(batches_consumed=n - 3))
    loader = DataLoader(s, batch_size=None, num_workers=2, multiprocessing_context="fork")
    it = iter(loader)
    s.clear_resume()
    assert sum(1 for _ in it) == 3
    assert sum(1 for _ in loader) == n


def test_an_empty_modality_list_is_refused(stores):
    with pytest.raises(ValueError, match="modalities is empty"):
        StoreStream(stores[700], 32, modalities=())
