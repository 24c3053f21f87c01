"""Pure batch-plan rules (data/plan.py): exactly once, equal counts, determinism, workers, remainder.

Run: .venv/bin/python -m pytest tests/test_plan.py -q
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data.plan import chunk_bounds, epoch_order, plan_epoch, rank_batches, step_sizes, worker_batch_ids
from data.split import cell_hash, is_validation

LAYOUTS = [[1000], [333, 1, 666], [7] * 13 + [0, 5], [100, 0, 250, 999, 2], [1]]


def _train_mask(n: int, val_fraction: float = 0.1) -> np.ndarray:
    return ~is_validation(cell_hash([f"cell{i}" for i in range(n)]), val_fraction)


def _all_batches(sizes, mask, world_size, num_workers, **kw):
    """Every batch yielded by every (rank, worker), looping in one process as the ranks would."""
    per_rank = []
    for rank in range(world_size):
        plan = plan_epoch(sizes, mask, rank=rank, world_size=world_size, **kw)
        got = []
        for w in range(num_workers):
            got += [plan.batches[i] for i in worker_batch_ids(len(plan), worker_id=w, num_workers=num_workers)]
        per_rank.append((plan, got))
    return per_rank


@pytest.mark.parametrize("sizes", LAYOUTS)
@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 3), (3, 2), (4, 1)])
@pytest.mark.parametrize("batch_size", [1, 16, 37])
def test_exactly_once_and_equal_counts_with_drop(sizes, world_size, num_workers, batch_size):
    n = sum(sizes)
    mask = _train_mask(n)
    per_rank = _all_batches(sizes, mask, world_size, num_workers, batch_size=batch_size, seed=3, epoch=1,
                            chunk_size=8, window_chunks=3)
    counts = {len(got) for _, got in per_rank}
    assert len(counts) == 1, f"ranks yield different batch counts {counts}"
    seen = np.concatenate([np.concatenate(got) if got else np.zeros(0, np.int64) for _, got in per_rank])
    assert len(seen) == len(np.unique(seen)), "a cell was yielded twice"
    assert mask[seen].all(), "a validation cell was yielded for training"
    plan0 = per_rank[0][0]
    assert len(seen) + plan0.n_dropped == mask.sum() == plan0.n_cells
    assert plan0.n_dropped < world_size * batch_size
    assert all(len(b) == batch_size for _, got in per_rank for b in got)


@pytest.mark.parametrize("sizes", LAYOUTS)
@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 3), (3, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("batch_size", [2, 16, 37, 5000])
def test_even_takes_every_cell_exactly_once_with_equal_counts(sizes, world_size, num_workers, batch_size):
    """The default rule: nothing dropped or repeated, the same batch count on every rank, every batch full but
    each rank's last (short, or up to 2 cells over when fewer than 2 per rank were left), none under 2 cells."""
    mask = _train_mask(sum(sizes))
    n = int(mask.sum())
    per_rank = _all_batches(sizes, mask, world_size, num_workers, batch_size=batch_size, seed=3, epoch=1,
                            remainder="even", chunk_size=8, window_chunks=3)
    assert len({len(got) for _, got in per_rank}) == 1
    if n < 2 * world_size:  # not 2 cells per rank: no batches (the stream refuses it by name)
        assert all(len(got) == 0 for _, got in per_rank)
        return
    seen = np.concatenate([np.concatenate(got) for _, got in per_rank])
    assert np.array_equal(np.sort(seen), np.flatnonzero(mask)), "not every training cell exactly once"
    assert per_rank[0][0].n_dropped == per_rank[0][0].n_padded == 0
    for plan, got in per_rank:
        sizes_ = [len(b) for b in plan.batches]
        assert all(x == batch_size for x in sizes_[:-1]) and 2 <= sizes_[-1] <= batch_size + 2, sizes_
        assert all(np.array_equal(b, np.sort(b)) for b in plan.batches)
    last = [len(plan.batches[-1]) for plan, _ in per_rank]
    assert max(last) - min(last) <= 1  # the remainder split as evenly as the ranks allow


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("remainder", ["drop", "pad", "even", "none"])
def test_step_sizes_is_every_ranks_batch_sizes(world_size, remainder):
    """The table a rank computes without communication equals what every rank's plan yields, step by step."""
    if remainder == "none" and world_size > 1:
        with pytest.raises(ValueError, match="different step counts"):
            step_sizes(10, batch_size=2, world_size=world_size, remainder=remainder)
        return
    for n, batch_size in itertools.product([0, 1, 3, 7, 16, 33, 100, 257], [1, 2, 5, 16]):
        order = np.random.default_rng(n).permutation(n)
        table = step_sizes(n, batch_size=batch_size, world_size=world_size, remainder=remainder)
        assert table.shape[1] == world_size and table.dtype == np.int64
        for rank in range(world_size):
            plan = rank_batches(order, batch_size=batch_size, rank=rank, world_size=world_size, remainder=remainder)
            assert table[:, rank].tolist() == [len(b) for b in plan.batches], (n, batch_size, rank, table)


@pytest.mark.parametrize("sizes", LAYOUTS[:4])
def test_pad_covers_every_cell_with_equal_full_batches(sizes):
    mask = _train_mask(sum(sizes))
    per_rank = _all_batches(sizes, mask, 3, 2, batch_size=32, remainder="pad", chunk_size=16)
    seen = np.concatenate([np.concatenate(got) for _, got in per_rank])
    assert len({len(got) for _, got in per_rank}) == 1
    assert set(seen.tolist()) == set(np.flatnonzero(mask).tolist())
    assert len(seen) == mask.sum() + per_rank[0][0].n_padded
    assert per_rank[0][0].n_padded < 3 * 32


def test_order_is_reproducible_and_changes_with_seed_and_epoch():
    sizes, mask = [500, 700], _train_mask(1200)
    a = epoch_order(sizes, mask, seed=1, epoch=0, chunk_size=32, window_chunks=4)
    assert np.array_equal(a, epoch_order(sizes, mask, seed=1, epoch=0, chunk_size=32, window_chunks=4))
    assert not np.array_equal(a, epoch_order(sizes, mask, seed=1, epoch=1, chunk_size=32, window_chunks=4))
    assert not np.array_equal(a, epoch_order(sizes, mask, seed=2, epoch=0, chunk_size=32, window_chunks=4))
    assert np.array_equal(np.sort(a), np.flatnonzero(mask))


def test_windows_hold_whole_chunks():
    """Each window of the order is the union of window_chunks whole chunks (the reader's buffer)."""
    sizes = [300, 200]
    mask = np.ones(500, bool)
    order = epoch_order(sizes, mask, seed=0, epoch=0, chunk_size=25, window_chunks=4)
    starts, _ = chunk_bounds(sizes, 25)
    chunk = np.searchsorted(starts, order, side="right") - 1
    for w in range(0, 20, 4):
        window = chunk[w * 25:(w + 4) * 25]
        assert len(np.unique(window)) == 4
    assert not np.array_equal(order, np.arange(500))


def test_chunks_never_cross_shards():
    starts, stops = chunk_bounds([10, 0, 7], 4)
    assert starts.tolist() == [0, 4, 8, 10, 14] and stops.tolist() == [4, 8, 10, 14, 17]


def test_sequence_independent_of_worker_count():
    """Interleaving the workers round-robin (what torch's DataLoader does) gives the W=1 sequence."""
    sizes, mask = [400, 401], _train_mask(801)
    plan = plan_epoch(sizes, mask, batch_size=10, seed=5, chunk_size=16)
    for nw in (2, 3, 7):
        per_worker = [list(worker_batch_ids(len(plan), worker_id=w, num_workers=nw)) for w in range(nw)]
        interleaved = [per_worker[k % nw][k // nw] for k in range(len(plan))]
        assert interleaved == list(range(len(plan)))
    # Resuming at position 13 keeps the round-robin in order too.
    nw = 3
    per_worker = [list(worker_batch_ids(len(plan), worker_id=w, num_workers=nw, start=13)) for w in range(nw)]
    interleaved = [per_worker[k % nw][k // nw] for k in range(len(plan) - 13)]
    assert interleaved == list(range(13, len(plan)))


def test_inference_mode_contiguous_ordered_blocks():
    sizes = [50, 0, 73]
    mask = np.ones(123, bool)
    blocks = []
    for rank in range(4):
        plan = plan_epoch(sizes, mask, batch_size=8, rank=rank, world_size=4, shuffle=False, remainder="none")
        cells = np.concatenate(plan.batches)
        assert np.array_equal(cells, np.arange(cells[0], cells[0] + len(cells))), "block not contiguous"
        assert all(len(b) == 8 for b in plan.batches[:-1])
        blocks.append(cells)
    assert np.array_equal(np.concatenate(blocks), np.arange(123)), "blocks must concatenate in store order"
    assert [len(b) for b in blocks] == [31, 31, 31, 30]


def test_split_stable_under_shard_layout():
    """The set of training cells depends only on the ids, never on how rows are cut into shards."""
    ids = [f"c{i}" for i in range(2000)]
    mask = ~is_validation(cell_hash(ids), 0.2)
    a = plan_epoch([2000], mask, batch_size=1, shuffle=False, remainder="none")
    b = plan_epoch([17, 983, 1000], mask, batch_size=1, shuffle=False, remainder="none")
    assert np.array_equal(np.concatenate(a.batches), np.concatenate(b.batches))


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="eligible mask has shape"):
        epoch_order([10], np.ones(11, bool), seed=0, epoch=0)
    with pytest.raises(ValueError, match="remainder"):
        rank_batches(np.arange(10), batch_size=2, rank=0, world_size=1, remainder="wrap")
    with pytest.raises(ValueError, match="rank"):
        rank_batches(np.arange(10), batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed >= 0 .* got seed=-1"):  # numpy said "expected non-negative integer"
        epoch_order([10], np.ones(10, bool), seed=-1, epoch=0)
