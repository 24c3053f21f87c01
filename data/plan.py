"""Which cells go where: pure functions from (layout, split, seed, epoch, rank, worker) to batches.

Nothing here touches disk, so every guarantee of the loader (each training cell exactly once per epoch,
equal batch counts on every rank, reproducible shuffles, exact resume) is a property of these functions
and is tested without a store.

The order of an epoch is built in two seeded levels, both from ``(seed, epoch)`` only:

1. **chunks**: each shard is cut into ``chunk_size`` consecutive rows (chunks never cross a shard, so a
   chunk is one contiguous read); the chunk order is permuted;
2. **windows**: ``window_chunks`` consecutive chunks of that order form a window whose cells are
   permuted together (the in-memory buffer of the reader holds one window at a time).

The per-rank batch sequence therefore depends on (seed, epoch, rank, world_size) and never on the number
of DataLoader workers. Inside a batch the cells are sorted by store row: membership is what the shuffle
decides, row order inside a batch carries no information, and sorted rows let the reader gather each
chunk's rows as one run. Worker ``w`` of ``W`` yields the rank's batches ``w, w+W, w+2W, ...`` and
torch's round-robin over workers puts them back in the same order.

Remainder rule (``remainder=``) for training, where every rank must take the same number of steps
(otherwise DDP collectives hang or abort, stack notes §2):

- ``"drop"`` (this module's default; the trainer's is ``"even"``): the epoch is cut to ``n_batches * world_size * batch_size`` cells; the dropped
  tail changes every epoch because the order is reshuffled, and is counted in ``EpochPlan.n_dropped``;
- ``"pad"``: the order is extended by repeating its first cells, counted in ``EpochPlan.n_padded``;
- ``"even"``: every cell exactly once and the same batch count on every rank: the full rounds as in
  ``"drop"``, then the ``r < world_size * batch_size`` remaining cells split over the ranks in contiguous
  pieces of ``r // W`` or ``r // W + 1`` cells, one short last batch each; when ``r < 2 * W`` (some rank's
  piece would be under 2 cells, which train-mode batch norm refuses) the pieces join the ranks' last full
  batches instead (up to 2 cells more). Nothing is dropped or repeated. The ranks' last batches then
  differ by up to one cell; ``step_sizes`` gives every rank every rank's sizes, so the trainer weighs
  each rank's mean by its share of the global batch and the step still equals one process's step on the
  concatenated batch;
- ``"none"``: no equalisation, for validation and inference: rank ``r`` takes the contiguous block
  ``[r*ceil(N/W), (r+1)*ceil(N/W))`` of the order (blocks concatenate to the whole order), cut into
  batches with a short last batch. Ranks may then differ in batch count (the last rank can be short).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REMAINDER_RULES = ("drop", "pad", "even", "none")


@dataclass(frozen=True)
class EpochPlan:
    """The batches one rank yields in one epoch, plus the bookkeeping of the remainder rule."""

    batches: list[np.ndarray]  # each an int64 array of global cell indices, in yield order
    n_cells: int  # eligible cells in the epoch over all ranks (before drop / pad)
    n_dropped: int  # cells left out this epoch over all ranks (remainder="drop")
    n_padded: int  # repeated cells added this epoch over all ranks (remainder="pad")

    def __len__(self) -> int:
        return len(self.batches)


def chunk_bounds(shard_sizes: list[int] | np.ndarray, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Global [start, stop) row ranges of the chunks: ``chunk_size`` rows, never crossing a shard."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    if sizes.ndim != 1 or np.any(sizes < 0):
        raise ValueError(f"shard_sizes must be a list of non-negative ints, got {shard_sizes!r}")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    starts = [np.arange(offsets[i], offsets[i + 1], chunk_size, dtype=np.int64) for i in range(len(sizes))]
    starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    # A chunk ends at the next chunk start or at its shard's end, whichever comes first.
    shard_end = offsets[np.searchsorted(offsets, starts, side="right")]
    stops = np.minimum(starts + chunk_size, shard_end)
    return starts, stops


def epoch_order(shard_sizes: list[int] | np.ndarray, eligible: np.ndarray, *, seed: int, epoch: int,
                shuffle: bool = True, chunk_size: int = 256, window_chunks: int = 16) -> np.ndarray:
    """Global indices of the eligible cells in this epoch's order (store order when ``shuffle=False``)."""
    eligible = np.asarray(eligible, dtype=bool)
    n_total = int(np.sum(shard_sizes))
    if eligible.shape != (n_total,):
        raise ValueError(f"eligible mask has shape {eligible.shape}, expected ({n_total},) for shards "
                         f"totalling {n_total} cells")
    cells = np.flatnonzero(eligible).astype(np.int64)
    if not shuffle or len(cells) == 0:
        return cells
    if window_chunks < 1:
        raise ValueError(f"window_chunks must be >= 1, got {window_chunks}")
    if seed < 0 or epoch < 0:  # numpy's seeding said only "expected non-negative integer"
        raise ValueError(f"the shuffle needs seed >= 0 and epoch >= 0, got seed={seed}, epoch={epoch}")
    starts, _ = chunk_bounds(shard_sizes, chunk_size)
    # Eligible cells of chunk i are cells[first[i]:first[i + 1]] (cells is sorted).
    first = np.append(np.searchsorted(cells, starts), len(cells))
    # Independent streams for the two levels, both derived from (seed, epoch) only.
    chunk_order = np.random.default_rng([seed, epoch, 0]).permutation(len(starts))
    cell_rng = np.random.default_rng([seed, epoch, 1])
    out = np.empty_like(cells)
    pos = 0
    # A loop over windows (not cells) keeps the temporaries to one window: O(n) memory is just `out`.
    for w in range(0, len(chunk_order), window_chunks):
        window = np.concatenate([cells[first[c]:first[c + 1]] for c in chunk_order[w:w + window_chunks]])
        cell_rng.shuffle(window)
        out[pos:pos + len(window)] = window
        pos += len(window)
    return out


def rank_batches(order: np.ndarray, *, batch_size: int, rank: int, world_size: int,
                 remainder: str = "drop") -> EpochPlan:
    """Cut an epoch order into this rank's batches following the remainder rule (module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if remainder not in REMAINDER_RULES:
        raise ValueError(f"remainder must be one of {REMAINDER_RULES}, got {remainder!r}")
    order = np.asarray(order, dtype=np.int64)
    n = len(order)
    n_dropped = n_padded = 0
    if remainder == "even":
        return _even_batches(order, batch_size, rank, world_size)
    if remainder == "none":
        per_rank = -(-n // world_size)
        mine = order[rank * per_rank:(rank + 1) * per_rank]
        batches = [np.sort(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
        return EpochPlan(batches, n, 0, 0)
    step = batch_size * world_size
    if remainder == "drop":
        n_batches = n // step
        n_dropped = n - n_batches * step
    else:
        n_batches = -(-n // step)
        n_padded = n_batches * step - n
        if n_padded and n:
            order = np.resize(order, n_batches * step)  # np.resize repeats from the start
    # Contiguous block per rank keeps each rank's reads inside its own windows (no overread).
    per_rank = n_batches * batch_size
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    batches = [np.sort(mine[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]
    return EpochPlan(batches, n, n_dropped, n_padded)


def _even_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> EpochPlan:
    """remainder="even" (module docstring); no batches at all under 2 cells per rank."""
    n = len(order)
    if n < 2 * world_size:
        return EpochPlan([], n, 0, 0)
    step = batch_size * world_size
    n_full, r = divmod(n, step)
    mine = order[rank * n_full * batch_size:(rank + 1) * n_full * batch_size]
    batches = [mine[i * batch_size:(i + 1) * batch_size] for i in range(n_full)]
    if r:
        piece = order[n_full * step:][r * rank // world_size:r * (rank + 1) // world_size]
        if r >= 2 * world_size:
            batches.append(piece)
        else:  # n >= 2 * world_size, so n_full >= 1 here
            batches[-1] = np.concatenate([batches[-1], piece])
    return EpochPlan([np.sort(b) for b in batches], n, 0, 0)


def step_sizes(n: int, *, batch_size: int, world_size: int, remainder: str = "drop") -> np.ndarray:
    """(steps, world_size) int64: the batch size of every rank at every step of an epoch of ``n`` cells.

    The same table on every rank with no communication (it depends on counts only, not on the order), so
    a rank knows the global batch and where its own slice sits in it. Equal to ``len`` of the batches
    ``rank_batches`` yields for each rank (tests/test_plan.py). ``"none"`` has no common step count over
    ranks and is only defined here for one process.
    """
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"need batch_size >= 1 and world_size >= 1, got {batch_size}, {world_size}")
    if remainder not in REMAINDER_RULES:
        raise ValueError(f"remainder must be one of {REMAINDER_RULES}, got {remainder!r}")
    step = batch_size * world_size
    if remainder == "none":
        if world_size != 1:
            raise ValueError("remainder='none' gives ranks different step counts: no common table")
        n_full, r = divmod(n, batch_size)
        return np.array([[batch_size]] * n_full + ([[r]] if r else []), dtype=np.int64).reshape(-1, 1)
    if remainder in ("drop", "pad"):
        n_steps = n // step if remainder == "drop" else -(-n // step)
        return np.full((n_steps, world_size), batch_size, dtype=np.int64)
    if n < 2 * world_size:
        return np.zeros((0, world_size), dtype=np.int64)
    n_full, r = divmod(n, step)
    sizes = np.full((n_full, world_size), batch_size, dtype=np.int64)
    if r:
        k = np.arange(world_size + 1)
        piece = np.diff(r * k // world_size)  # the slices _even_batches cuts, rank by rank
        if r >= 2 * world_size:
            sizes = np.vstack([sizes, piece])
        else:
            sizes[-1] += piece
    return sizes


def plan_epoch(shard_sizes: list[int] | np.ndarray, eligible: np.ndarray, *, batch_size: int, seed: int = 0,
               epoch: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
               remainder: str = "drop", chunk_size: int = 256, window_chunks: int = 16) -> EpochPlan:
    """This rank's batches for one epoch (see the module docstring for the rules)."""
    order = epoch_order(shard_sizes, eligible, seed=seed, epoch=epoch, shuffle=shuffle,
                        chunk_size=chunk_size, window_chunks=window_chunks)
    return rank_batches(order, batch_size=batch_size, rank=rank, world_size=world_size, remainder=remainder)


def worker_batch_ids(n_batches: int, *, worker_id: int, num_workers: int, start: int = 0) -> range:
    """Positions (in the rank's sequence) that worker ``worker_id`` yields, resuming at ``start``.

    Counting from ``start`` (not from 0) keeps torch's round-robin, which always begins with worker 0,
    in the uninterrupted order after a mid-epoch resume.
    """
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise ValueError(f"need 0 <= worker_id < num_workers, got {worker_id}, {num_workers}")
    if not 0 <= start <= n_batches:
        raise ValueError(f"resume position {start} outside [0, {n_batches}]")
    return range(start + worker_id, n_batches, num_workers)
