"""StoreStream: the IterableDataset that feeds training, validation and inference from a store.

Which cells a (rank, worker) yields is decided by ``data.plan`` (pure); this module only wires the plan
to the reader, the collate step and a background prefetch thread.

* ``split="train"`` (default remainder ``"even"``): every training cell exactly once per epoch, each rank's
  last batch short (``data.plan``); ``"drop"`` leaves the ``< world_size * batch_size`` cells left over out
  (counted in ``plan.n_dropped``), ``"pad"`` fills the last batches with repeated cells (``plan.n_padded``:
  up to most of every batch when there are fewer cells than ranks x batch); ``len(stream)`` is equal on every rank.
* ``split="validation"`` / ``"all"`` (default remainder ``"none"``): every selected cell exactly once
  across ranks; rank ``r`` gets a contiguous block of the order, so **ranks may differ by a batch or
  more** and the last batch may be short. Aggregate validation with summed losses and cell counts
  (all-reduce both), never with a mean of per-rank means. With ``shuffle=False`` and ``split="all"``
  the blocks concatenate in store order: the inference mode.
* Resume: ``state_dict()`` records (epoch, batches consumed on this rank); ``load_state_dict()`` makes
  the next iteration yield exactly the rest of that epoch. With ``num_workers=0`` the stream counts
  consumed batches itself; with DataLoader workers it cannot see what the trainer took, so pass
  ``state_dict(batches_consumed=n)`` (refused without it once ``share_position`` was called). A state
  from another world size is refused (ValueError).
* Chunking (``chunk_size`` rows per read, ``window_chunks`` chunks shuffled together): when the caller
  sets neither, a store that records ``preshuffled: true`` is read in 1,024-row chunks, 4 per window,
  others in 256-row chunks, 16 per window (``default_chunking``). ``state_dict`` records the chunking and
  a resume under another one is refused (the epoch's order depends on it).
* Speed: the slices of every chunk a read round needs go to zarr as one call per array.
* Workers: with ``DataLoader(num_workers=W)`` worker ``w`` yields batches ``w, w+W, ...`` of the rank's
  sequence and the DataLoader's round-robin restores the W=0 order. Each worker reads whole chunks of
  the windows it touches, so W workers read up to W times the bytes; ``num_workers=0`` (the default
  recommendation) relies on the prefetch thread instead. Forked workers read through zarr's default
  codec pipeline (zarrs' thread pool does not survive a fork); spawned workers keep zarrs. Use
  ``batch_size=None`` in the DataLoader: the stream already yields whole minibatches.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info

from data import keys
from data.cell_table import as_store, read_cell_table, read_validation_mask
from data.collate import collate
from data.plan import EpochPlan, chunk_bounds, plan_epoch, worker_batch_ids
from data.reader import ChunkReader
from data.retry import take_stats
from data.store import Store
from data.typed_config import ConfigError

SPLITS = ("train", "validation", "all")
_DONE = object()
_DEFAULT_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
# (chunk_size, window_chunks) when the caller sets neither: the same 4,096-row shuffle window either way.
# A store that records ``preshuffled: true`` (cells written in random order: mva-synth, mva-build
# preshuffle=true) is read in 4x coarser chunks: contiguous rows of such a store are as mixed as any, so
# the shuffle loses nothing, and a quarter of the reads cost ~1.5x less CPU per cell. Stores sorted by
# sample (or older stores without the attribute) keep 256-row chunks, 16 per window.
CHUNKING = (256, 16)
CHUNKING_PRESHUFFLED = (1024, 4)


def default_chunking(store: Store, chunk_size: int | None, window_chunks: int | None) -> tuple[int, int]:
    """The stream's (chunk_size, window_chunks): the caller's values, else the store's defaults above.

    Store-dependent defaults apply only when both are unset; one set value keeps the other's fixed
    default (so a caller's chunk_size never silently changes the window size behind it)."""
    if chunk_size is None and window_chunks is None:
        return CHUNKING_PRESHUFFLED if store.root.attrs.get("preshuffled", False) is True else CHUNKING
    return (int(chunk_size) if chunk_size is not None else CHUNKING[0],
            int(window_chunks) if window_chunks is not None else CHUNKING[1])


# what a saved stream position must agree on (besides world size, n_cells and the batch count)
_RESUME_KEYS = ("seed", "batch_size", "split", "shuffle", "remainder", "chunk_size", "window_chunks", "val_fraction")


class StoreStream(IterableDataset):
    def __init__(self, store: Store | str | os.PathLike, batch_size: int, split: str = "train",
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, *,
                 val_fraction: float = 0.1, remainder: str | None = None, chunk_size: int | None = None,
                 window_chunks: int | None = None, prefetch: int = 4, dense: bool = False, size_factor: bool = False,
                 modalities: tuple[str, ...] = keys.MODALITIES):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        bad = [m for m in modalities if m not in keys.MODALITIES]
        if bad:
            raise ValueError(f"unknown modalities {bad}; choose from {keys.MODALITIES}")
        if not modalities:
            raise ValueError(f"modalities is empty: read at least one of {keys.MODALITIES}")
        self._store = as_store(store)
        self.path, self._identity = self._store.path, self._store.identity
        self.meta = self._store.meta
        self.batch_size, self.split, self.shuffle, self.seed = int(batch_size), split, bool(shuffle), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.val_fraction = float(val_fraction)
        self.remainder = remainder or ("even" if split == "train" else "none")
        self.chunk_size, self.window_chunks = default_chunking(self._store, chunk_size, window_chunks)
        self.prefetch, self.dense, self.size_factor = int(prefetch), bool(dense), bool(size_factor)
        self.modalities = tuple(modalities)
        self.n_features = {keys.RNA: self.meta.n_genes, keys.ATAC: self.meta.n_regions}
        self.shard_sizes = np.diff(np.asarray(self.meta.shard_offsets, dtype=np.int64))
        # Split by id hash only: independent of shard layout, world size and workers. For "all" the mask
        # (all True) is built on first use: inference only calls make_batch and never needs it.
        self._eligible: np.ndarray | None = None
        # Which cell is on which row (shard sizes and id hashes), for the resume check: a store rebuilt in
        # place with the same cell count (another shard_size or preshuffle seed) gave the rest of the epoch
        # on other rows. None for "all" (inference never resumes a stream and skips this read).
        self.rows_fingerprint: str | None = None
        self._store.verify_files()  # a lost file would read as zeros
        if split != "all":
            digest = hashlib.blake2b(digest_size=16)
            val = read_validation_mask(self._store, self.val_fraction, digest)
            self._eligible = val if split == "validation" else ~val
            self.rows_fingerprint = digest.hexdigest()
        self.table = read_cell_table(self._store)
        self.epoch = 0
        self._resume_at = 0  # first batch of the next iteration (set by load_state_dict)
        # in a DataLoader worker, put the worker's store-read counters on each batch (keys.READ_STATS): they are
        # counted in the worker's process, and the trainer's report only sees its own (trainer/streams.py)
        self.report_read_stats = False
        self._consumed = 0  # batches handed out in the current epoch (num_workers=0)
        self._plan_cache: tuple[int, EpochPlan] | None = None
        self._reader: ChunkReader | None = None
        self._pid = os.getpid()
        # [epoch, resume position] in shared memory, read by persistent DataLoader workers (share_position)
        self._shared_position = None
        # The plan (8 bytes per planned cell) is built on first use for "all": the inference runner
        # reads by make_batch only, and a 1M-cell plan would be its largest per-cell structure (issue #5).
        plan = self.plan() if split != "all" else None
        if split == "train" and plan.n_cells == 0:  # no batch size or remainder rule can help here
            raise ConfigError(f"split 'train' of {self.path} has no cells (data.val_fraction={self.val_fraction} "
                              f"puts all {self.meta.n_cells} in validation): lower data.val_fraction")
        if split == "train" and len(plan) == 0 and self.remainder == "even":
            raise ConfigError(f"split 'train' has {plan.n_cells} cells, fewer than 2 per rank ({self.world_size} "
                              "ranks): use fewer processes or a larger store")
        if split == "train" and len(plan) == 0 and self.remainder == "none":
            # (mva-train refuses none with several processes first; this is the Python API's message)
            raise ConfigError(f"split 'train' has {plan.n_cells} cells, fewer than one per rank ({self.world_size} "
                              "ranks) under data.remainder=none: use fewer processes or data.remainder=pad")
        if split == "train" and len(plan) == 0:
            # ConfigError (a ValueError): mva-train prints it as one line, not a traceback
            raise ConfigError(f"split 'train' has {plan.n_cells} cells, fewer than world_size x batch_size = "
                              f"{self.world_size} x {self.batch_size}: lower data.batch_size or use "
                              "data.remainder=even or pad")

    @property
    def eligible(self) -> np.ndarray:
        """(n_cells,) bool: the cells of this stream's split (global row order)."""
        if self._eligible is None:
            self._eligible = np.ones(self.meta.n_cells, dtype=bool)
        return self._eligible

    # ------------------------------------------------------------------------------------ plan
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's batches for ``epoch`` (default: the current one); cached for the current epoch."""
        e = self.epoch if epoch is None else int(epoch)
        if self._plan_cache is not None and self._plan_cache[0] == e:
            return self._plan_cache[1]
        plan = plan_epoch(self.shard_sizes, self.eligible, batch_size=self.batch_size, seed=self.seed, epoch=e,
                          rank=self.rank, world_size=self.world_size, shuffle=self.shuffle,
                          remainder=self.remainder, chunk_size=self.chunk_size, window_chunks=self.window_chunks)
        if e == self.epoch:
            self._plan_cache = (e, plan)
        return plan

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a pending resume position is kept only if it is for this same epoch."""
        if int(epoch) != self.epoch:
            self.epoch, self._resume_at, self._consumed = int(epoch), 0, 0
        self._publish_if_shared()

    def _publish_if_shared(self) -> None:
        """After share_position, the workers read their epoch and resume position only from the shared array:
        set_epoch / load_state_dict in the process that owns the loader write it, or every epoch of the README's
        worker recipe repeated epoch 0's order and a resume replayed epoch 0 (clear_resume does not: the workers
        may start their pass after it, and must still see the position)."""
        if self._shared_position is not None and get_worker_info() is None:
            self.publish_position()

    def __len__(self) -> int:
        return len(self.plan())

    # ------------------------------------------------------------------------------------ resume
    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        if batches_consumed is None and self._shared_position is not None:
            # workers iterate their own copies: this one's count stays at the resume point (0 mid-epoch), and a
            # checkpoint with it would replay the epoch's batches already trained on
            raise ValueError("this stream feeds DataLoader workers (share_position), which it cannot see "
                             "consume batches: pass state_dict(batches_consumed=<batches the trainer took>)")
        done = self._consumed if batches_consumed is None else int(batches_consumed)
        return {"epoch": self.epoch, "batches_consumed": done, "world_size": self.world_size,
                "rank": self.rank, "seed": self.seed, "batch_size": self.batch_size, "split": self.split,
                "shuffle": self.shuffle, "remainder": self.remainder, "chunk_size": self.chunk_size,
                "window_chunks": self.window_chunks, "val_fraction": self.val_fraction,
                "rows_fingerprint": self.rows_fingerprint, "n_cells": int(self.meta.n_cells), "n_batches": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["world_size"]) != self.world_size:
            raise ValueError(f"loader state was saved with world_size={state['world_size']} but this run has "
                             f"world_size={self.world_size}; the per-rank cell assignment would differ, so a "
                             f"mid-epoch resume cannot be exact (restart the epoch instead)")
        here = {**{k: getattr(self, k) for k in _RESUME_KEYS}, "n_cells": int(self.meta.n_cells),
                "rows_fingerprint": self.rows_fingerprint}
        for k, mine in here.items():
            # chunking decides the epoch's order, val_fraction and the store's cells which cells it has;
            # states saved before a key was recorded skip that check
            if state.get(k, mine) != mine:
                raise ValueError(f"loader state has {k}={state[k]!r} but this stream has {k}={mine!r}: "
                                 "the rest of that epoch would not be the same cells")
        # every check before any change: a refused state must leave the stream at its own epoch and position
        epoch = int(state["epoch"])
        plan = self.plan(epoch)
        n = len(plan)
        if state.get("n_batches", n) != n:
            raise ValueError(f"loader state's epoch has {state['n_batches']} batches but this stream's has {n}: "
                             "the rest of that epoch would not be the same cells")
        if not 0 <= int(state["batches_consumed"]) <= n:
            raise ValueError(f"batches_consumed={state['batches_consumed']} outside [0, {n}]")
        self.epoch, self._plan_cache = epoch, (epoch, plan)
        self._resume_at = self._consumed = int(state["batches_consumed"])
        self._publish_if_shared()

    # ------------------------------------------------------------------------------------ reading
    def _get_reader(self) -> ChunkReader:
        # A DataLoader worker reopens the store: the parent's handles and threads are not its own.
        if self._reader is None or self._pid != os.getpid():
            if self._pid != os.getpid():
                if self._pid != -1:
                    # Forked (not spawned) worker: zarrs' Rust thread pool did not survive the fork and
                    # its first read would hang forever, so this process falls back to zarr's own
                    # pipeline (slower; prefer num_workers=0 or multiprocessing_context="spawn").
                    zarr.config.set({"codec_pipeline.path": _DEFAULT_PIPELINE})
                self._store, self._pid = as_store(self.path), os.getpid()
                self._store.check_unchanged(self._identity)  # the plan and cell table are the parent's
            starts, stops = chunk_bounds(self.shard_sizes, self.chunk_size)
            # Two windows of chunks: a batch at a window boundary touches both.
            # never more slots than the store has chunks: the pool is preallocated (a 400-cell store with
            # window_chunks=100000 asked for 36 GiB)
            self._reader = ChunkReader(self._store, starts, stops,
                                       cache_chunks=min(2 * self.window_chunks + 2, len(starts)),
                                       modalities=self.modalities)
        return self._reader

    def recode(self, batch: np.ndarray | None = None, cat_covs: list[np.ndarray | None] | tuple = ()) -> None:
        """Give batches other category codes: ``batch[code]`` for the batch and ``cat_covs[j][code]`` for
        covariate j (None: unchanged). For a model trained on a store with more categories than this one
        (inference on a store of some of its batches), whose codes number the categories differently."""
        t = self.table
        if batch is not None:
            t.batch = np.asarray(batch, dtype=np.int64)[t.batch]
        if any(m is not None for m in cat_covs):
            covs = t.cat_covs.astype(np.int64)  # the model's codes may not fit the stored width
            for j, m in enumerate(cat_covs):
                if m is not None:
                    covs[:, j] = np.asarray(m, dtype=np.int64)[covs[:, j]]
            t.cat_covs = covs

    def make_batch(self, cells: np.ndarray) -> dict[str, torch.Tensor]:
        blocks = self._get_reader().gather(cells)
        return collate(cells, blocks, self.table, self.n_features, dense=self.dense, size_factor=self.size_factor)

    def _batches(self, plan: EpochPlan, ids: list[int]):
        # Read ahead about one window of cells: its chunks decode while this window is gathered.
        # Issued one window's worth of batches at a time (not per batch): one event-loop round per window
        # keeps the wake-ups and per-round overhead off small batches, and reads 1-2 windows ahead.
        ahead = max(1, -(-self.window_chunks * self.chunk_size // self.batch_size))
        reader = self._get_reader()
        issued = 1  # batches [0, issued) are read on demand or already requested
        for j, i in enumerate(ids):
            if j + ahead >= issued and issued < len(ids):
                stop = min(issued + ahead, len(ids))
                reader.read_ahead(np.concatenate([plan.batches[k] for k in ids[issued:stop]]))
                issued = stop
            yield self.make_batch(plan.batches[i])

    def clear_resume(self) -> None:
        """Forget a pending resume position. ``__iter__`` does this itself, but with DataLoader workers it
        runs in the workers' copies: call this once ``iter(DataLoader)`` has started them, or every later
        pass over the same epoch in this process would skip the resumed prefix again."""
        self._resume_at = 0

    def share_position(self, ctx) -> None:
        """Let persistent DataLoader workers (``ctx``: the loader's multiprocessing context) follow this
        stream's epoch and resume position. Such workers keep the copy of the stream they were started with
        across epochs, so ``set_epoch`` / ``load_state_dict`` here would not reach them by themselves; each of
        their passes reads what :meth:`publish_position` last wrote instead (both call it). Call before the
        workers start."""
        self._shared_position = ctx.RawArray("q", 2)
        self.publish_position()

    def publish_position(self) -> None:
        """Write this stream's epoch and resume position for the workers' next pass (before ``iter(loader)``)."""
        self._shared_position[:] = [self.epoch, self._resume_at]

    def __iter__(self):
        info = get_worker_info()
        if info is not None and self._shared_position is not None:
            epoch, self._resume_at = (int(v) for v in self._shared_position)
            if epoch != self.epoch:
                self.epoch, self._plan_cache = epoch, None
        plan = self.plan()
        start, self._resume_at = self._resume_at, 0
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        ids = worker_batch_ids(len(plan), worker_id=wid, num_workers=nw, start=start)
        self._consumed = start
        source = self._batches(plan, list(ids))
        it = _prefetched(source, self.prefetch) if self.prefetch > 0 else source
        for batch in it:
            self._consumed += 1
            if self.report_read_stats and info is not None:
                batch[keys.READ_STATS] = torch.tensor(take_stats(), dtype=torch.int64)
            yield batch

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers reopen the store by path; open handles and threads do not pickle.
        state = self.__dict__.copy()
        state["_store"], state["_reader"], state["_pid"] = None, None, -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _prefetched(source, depth: int):
    """Run ``source`` in a background thread, ``depth`` items ahead; errors re-raise in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        # Never block forever: the consumer may have stopped early (break, error, generator closed).
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in source:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            put(exc)

    t = threading.Thread(target=produce, name="mva-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)
