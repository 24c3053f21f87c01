"""Edge cases of the streaming loader on tiny real stores: chunk bounds a caller passes to the reader,
rows outside the store, refused resume states, 1-cell batches, and the contract (each cell once, equal
batch counts, correct rows and per-cell columns, exact resume under any worker count) where stores are
smaller than ranks x workers x batch and shards and chunks do not divide evenly.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_stream_edges.py
"""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DataLoader

from data import keys
from data.reader import ChunkReader
from data.store import open_store
from data.stream import StoreStream
from data.synthetic import write_synthetic_store

N_CELLS, SHARD = 37, 10  # shards of 10, 10, 10 and 7 cells: nothing divides evenly


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("edges") / "s.zarr", n_cells=N_CELLS, n_genes=7,
                                 n_regions=11, seed=3, shard_size=SHARD, with_covariates=True, progress=False)


@pytest.fixture(scope="module")
def truth(store):
    """The store read directly: dense counts per modality and the obs columns, in global row order."""
    st = open_store(store)
    sizes = np.diff(st.meta.shard_offsets)
    counts = {m: np.vstack([st.read_rows(m, s, 0, int(n)).toarray() for s, n in enumerate(sizes)])
              for m in keys.MODALITIES}
    return counts, st.read_obs()


def _assert_batch_is_the_store(batch, truth):
    counts, obs = truth
    idx = batch[keys.INDEX].numpy()
    for m in keys.MODALITIES:
        assert np.array_equal(batch[m].to_dense().numpy(), counts[m][idx]), m
    assert np.array_equal(batch[keys.MASK].numpy(), obs[["mask_rna", "mask_atac"]].values[idx])
    assert np.array_equal(batch[keys.BATCH].numpy(), obs["batch"].cat.codes.values[idx])
    assert np.array_equal(batch[keys.CAT_COVS][:, 0].numpy(), obs["site"].cat.codes.values[idx])
    assert np.array_equal(batch[keys.LABEL].numpy(), obs["cell_type"].cat.codes.values[idx])


def _indices(batches):
    return [b[keys.INDEX].numpy().tolist() for b in batches]


# ------------------------------------------------------------------------------------ reader chunk bounds
def test_a_chunk_across_a_shard_boundary_is_refused_by_name(store):
    """A caller's chunk [5, 15) spans shards 0 and 1; it was read as one slice of shard 0's arrays, which
    end at row 10 (a bare IndexError from deep in the reader, or empty rows)."""
    st = open_store(store)
    with pytest.raises(ValueError, match=r"chunk 1 \[5, 15\) crosses the shard boundary at row 10 "
                                         r"\(shard 0 holds rows \[0, 10\)\)"):
        ChunkReader(st, np.array([0, 5, 15]), np.array([5, 15, 20]), cache_chunks=2)


@pytest.mark.parametrize(("starts", "stops", "needle"), [
    ([0, 4], [4, 4], r"chunk 1 \[4, 4\) is empty"),
    ([0, 3], [5, 8], r"chunk 1 \[3, 8\) starts before chunk 0 \[0, 5\) ends"),
    ([4, 0], [8, 3], r"chunk 1 \[0, 3\) starts before chunk 0"),
    ([30], [40], r"chunk 0 \[30, 40\) lies outside the store's rows \[0, 37\)"),
    ([-2], [3], r"chunk 0 \[-2, 3\) lies outside"),
])
def test_bad_chunk_bounds_are_refused_at_construction(store, starts, stops, needle):
    with pytest.raises(ValueError, match=needle):
        ChunkReader(open_store(store), np.array(starts), np.array(stops), cache_chunks=1)


def test_a_caller_s_own_shard_local_chunks_read_the_store_s_rows(store, truth):
    """Chunks of unequal length that stop at every shard boundary (and leave rows 10-11 out) read exactly
    the store's rows; a row in no chunk is refused rather than taken from a neighbouring slot."""
    st = open_store(store)
    reader = ChunkReader(st, np.array([0, 4, 12, 20, 30]), np.array([4, 10, 20, 30, 37]), cache_chunks=2)
    cells = np.array([3, 4, 9, 12, 19, 20, 29, 30, 36])
    blocks = reader.gather(cells)
    for m in keys.MODALITIES:
        got = np.zeros((len(cells), truth[0][m].shape[1]), np.float32)
        b = blocks[m]
        for r in range(len(cells)):
            got[r, b.indices[b.indptr[r]:b.indptr[r + 1]]] = b.data[b.indptr[r]:b.indptr[r + 1]]
        assert np.array_equal(got, truth[0][m][cells]), m
    with pytest.raises(ValueError, match=r"rows \[11\] lie outside the reader's chunks"):
        reader.gather(np.array([9, 11]))


@pytest.mark.parametrize("cells", [[-1], [N_CELLS], [5, N_CELLS + 3]])
def test_make_batch_refuses_rows_outside_the_store(store, cells):
    """make_batch (inference, DE sampling) with row -1 returned the last chunk's garbage under index -1
    and the last cell's mask; rows >= n_cells ended in a bare IndexError."""
    s = StoreStream(store, 4, split="all", shuffle=False, chunk_size=4, prefetch=0)
    with pytest.raises(ValueError, match="lie outside the reader's chunks"):
        s.make_batch(np.array(cells))


# ------------------------------------------------------------------------------------ resume states
def test_a_refused_state_leaves_the_stream_at_its_own_epoch(store):
    """load_state_dict set the state's epoch before it checked the batch count: a refused state left the
    stream at that other epoch, so a caller that restarts its epoch after the error got another order."""
    s = StoreStream(store, 2, seed=5, chunk_size=3, window_chunks=2, prefetch=0)
    s.set_epoch(1)
    want = [b.tolist() for b in StoreStream(store, 2, seed=5, chunk_size=3, window_chunks=2).plan(1).batches]
    foreign = StoreStream(store, 2, seed=5, chunk_size=3, window_chunks=2, val_fraction=0.5).state_dict(7)
    del foreign["val_fraction"]  # as saved before it was recorded: only the batch count can tell
    foreign["epoch"] = 6
    with pytest.raises(ValueError, match="batches but this stream's has"):
        s.load_state_dict(foreign)
    assert s.epoch == 1 and s.state_dict()["batches_consumed"] == 0
    assert _indices(s) == want


def test_a_state_without_the_trainer_s_count_is_refused_once_workers_share_the_position(store):
    """Persistent workers iterate their own copies, so the stream's own count stays at 0 mid-epoch: a state saved
    from it would replay the batches already trained on. With share_position the count must be passed."""
    import multiprocessing

    s = StoreStream(store, 2, seed=5, chunk_size=3, window_chunks=2, prefetch=0)
    assert s.state_dict()["batches_consumed"] == 0  # in-process use: the stream counts itself
    s.share_position(multiprocessing.get_context("fork"))
    with pytest.raises(ValueError, match=r"state_dict\(batches_consumed="):
        s.state_dict()
    assert s.state_dict(batches_consumed=3)["batches_consumed"] == 3


def test_the_readme_worker_recipe_follows_set_epoch_and_a_resume(store):
    """README: share_position(ctx) before the workers start, set_epoch / load_state_dict, clear_resume() once they
    started. The workers read their epoch only from the shared array, which only publish_position() wrote: every
    epoch repeated epoch 0's order, and a resume into epoch 1 replayed all of epoch 0 (the trainer, which calls
    publish_position itself, was right)."""
    import torch

    def ids(batches):
        return [b[keys.INDEX].tolist() for b in batches]

    kw = {"seed": 0, "chunk_size": 2, "window_chunks": 2, "prefetch": 0}
    ctx = torch.multiprocessing.get_context("spawn")
    s = StoreStream(store, 4, **kw)
    s.share_position(ctx)
    dl = DataLoader(s, batch_size=None, num_workers=2, persistent_workers=True, multiprocessing_context=ctx)
    for epoch in range(3):
        s.set_epoch(epoch)
        assert ids(dl) == [b.tolist() for b in s.plan(epoch).batches], epoch
    assert s.plan(1).batches[0].tolist() != s.plan(0).batches[0].tolist()  # the epochs' orders differ

    saved = StoreStream(store, 4, **kw)
    saved.set_epoch(1)
    state = saved.state_dict(batches_consumed=5)
    r = StoreStream(store, 4, **kw)
    r.share_position(ctx)
    dl = DataLoader(r, batch_size=None, num_workers=2, persistent_workers=True, multiprocessing_context=ctx)
    r.load_state_dict(state)
    it = iter(dl)
    r.clear_resume()
    assert ids(it) == [b.tolist() for b in r.plan(1).batches][5:]
    r.set_epoch(2)
    assert ids(dl) == [b.tolist() for b in r.plan(2).batches]


def test_remainder_none_on_more_ranks_than_cells_names_what_helps(tmp_path):
    # it said "lower data.batch_size or use data.remainder=even or pad": batch 1 and even fail the same way
    two = write_synthetic_store(tmp_path / "two.zarr", n_cells=2, n_genes=5, n_regions=7, progress=False)
    with pytest.raises(ValueError, match=r"fewer than one per rank \(3 ranks\) under data.remainder=none: use fewer "
                                         r"processes or data.remainder=pad"):
        [StoreStream(two, 1, rank=r, world_size=3, val_fraction=0.0, remainder="none") for r in range(3)]


@pytest.mark.parametrize("where", ["first", "second", "last", "end"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_anywhere_with_another_worker_count_yields_the_rest(store, truth, where, num_workers):
    """The per-rank sequence does not depend on the DataLoader's workers, so a position saved by a
    worker-less run resumes under 2 workers (more workers than batches left at the end) and vice versa."""
    kw = {"seed": 9, "rank": 1, "world_size": 2, "chunk_size": 3, "window_chunks": 2, "prefetch": 1}
    full = StoreStream(store, 3, **kw)
    full.set_epoch(4)
    want = list(full)
    n = len(want)
    start = {"first": 0, "second": 1, "last": n - 1, "end": n}[where]
    s = StoreStream(store, 3, **kw)
    s.load_state_dict(full.state_dict(batches_consumed=start))
    s.set_epoch(4)  # the trainer's epoch loop: keeps the position of the same epoch
    got = list(DataLoader(s, batch_size=None, num_workers=num_workers, multiprocessing_context="fork")
               if num_workers else s)
    assert _indices(got) == _indices(want[start:])
    for b in got:
        _assert_batch_is_the_store(b, truth)


# ------------------------------------------------------------------------------------ tiny stores
@pytest.mark.parametrize(("batch_size", "world_size", "chunk_size", "remainder", "val_fraction"), [
    (1, 3, 1, "drop", 0.0),  # one cell per batch, one row per chunk
    (4, 3, 7, "drop", 0.3),  # chunks across no shard but ending short at every shard end
    (8, 2, 64, "pad", 0.0),  # one chunk per shard
    (50, 1, 3, "pad", 0.3),  # a batch larger than the store
    (16, 3, 5, "pad", 0.9),  # a handful of training cells for 3 ranks x 16
])
def test_tiny_store_each_cell_once_equal_batches_and_the_right_rows(store, truth, batch_size, world_size,
                                                                    chunk_size, remainder, val_fraction):
    streams = [StoreStream(store, batch_size, seed=1, rank=r, world_size=world_size, chunk_size=chunk_size,
                           window_chunks=2, remainder=remainder, val_fraction=val_fraction) for r in range(world_size)]
    per_rank = [list(s) for s in streams]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(streams[0]) > 0
    train = np.flatnonzero(streams[0].eligible)
    plan = streams[0].plan()
    seen = np.concatenate([b[keys.INDEX].numpy() for batches in per_rank for b in batches])
    for batches in per_rank:
        for b in batches:
            assert len(b[keys.INDEX]) == batch_size
            _assert_batch_is_the_store(b, truth)
    if remainder == "drop":
        assert len(np.unique(seen)) == len(seen) and len(seen) + plan.n_dropped == len(train)
    else:
        assert set(seen.tolist()) == set(train.tolist()) and len(seen) == len(train) + plan.n_padded
    # validation: every held-out cell once over the ranks, none of them a training cell
    val = [StoreStream(store, batch_size, split="validation", shuffle=False, rank=r, world_size=world_size,
                       chunk_size=chunk_size, val_fraction=val_fraction) for r in range(world_size)]
    vcells = [b[keys.INDEX].numpy() for s in val for b in s]
    vcells = np.concatenate(vcells) if vcells else np.zeros(0, np.int64)
    assert np.array_equal(vcells, np.flatnonzero(val[0].eligible))
    assert not np.isin(vcells, train).any() and len(vcells) + len(train) == N_CELLS


# ------------------------------------------------------------------------------------ trainer guard
def test_batch_size_one_with_batch_norm_is_refused_at_start_up(store, tmp_path):
    """data.batch_size=1 makes every batch 1 cell: the adversarial classifier's batch norm raised
    "Expected more than 1 value per channel when training" (a ValueError traceback) at the first step."""
    from tests.train_utils import tiny_config
    from trainer.config import ConfigError
    from trainer.streams import check_last_batch

    cfg = tiny_config(store, tmp_path / "run", **{"data.batch_size": 1, "data.chunk_size": 4})
    stream = StoreStream(store, 1, chunk_size=4, prefetch=0)
    with pytest.raises(ConfigError, match=r"data.batch_size=1 makes every training batch 1 cell .*adversarial"):
        check_last_batch(stream, cfg, has_classifier=True)
    check_last_batch(stream, cfg, has_classifier=False)  # no batch norm anywhere: 1-cell batches train


def test_a_read_past_the_end_of_an_array_is_refused_not_clipped(store):
    """zarr clips ``array[a:b]`` past the end as numpy does: a request beyond an array came back short and
    would shift every row after it. ``fetch_all`` (the reader's one read path) refuses it, naming the array;
    in-range requests, grouped into one pipeline call, still come back exactly."""
    import asyncio

    import zarr

    from data.range_reads import fetch_all

    arr = zarr.open_group(str(store), mode="r")["shards/00000/mod/rna/X/data"]  # the first shard's RNA counts
    n = arr.shape[0]
    whole = np.asarray(arr[:])
    got = asyncio.run(fetch_all([(arr, 0, 2), (arr, 1, n)]))
    np.testing.assert_array_equal(got[0], whole[0:2])
    np.testing.assert_array_equal(got[1], whole[1:n])
    for a, b in ((0, n + 1), (-1, 2), (3, 2)):
        with pytest.raises(ValueError, match=rf"read of \[{a}, {b}\) outside .*length {n}"):
            asyncio.run(fetch_all([(arr, 0, 1), (arr, a, b)]))
