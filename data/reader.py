"""Hot-path reads for the streaming loader: per-cell arrays once, count rows by whole chunks.

The reader only reads; which rows are needed is decided by ``data.plan``. Two things matter for speed
and memory (stack notes §4):

* count matrices are read as *contiguous* row blocks (one chunk of the plan = one shard-local row range:
  an ``indptr`` slice, then one ``data`` and one ``indices`` slice per modality, through the zarrs
  codec pipeline), and the four slices of a block are read concurrently;
* the per-cell table keeps only compact numeric arrays (codes, masks, covariates), never the string cell
  ids, so memory grows by a few bytes per cell and a 1M-cell store costs about the same as a 50k one.

A small LRU of decoded chunks (the in-memory "window" of the plan) serves the batches of a window; the
gather of a batch's rows from those chunks is vectorised numpy.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zarr

from data import keys
from data.store import Store, open_store


@dataclass
class CellTable:
    """Per-cell arrays over the whole store, in global row order."""

    batch: np.ndarray  # (n,) int32 batch codes
    cat_covs: np.ndarray  # (n, K) int32 codes
    cont_covs: np.ndarray  # (n, C) float32
    label: np.ndarray | None  # (n,) int32, -1 unknown; None when the store has no labels
    mask: np.ndarray  # (n, 2) bool [RNA measured, ATAC measured]
    library: np.ndarray  # (n, 2) float32 [RNA, ATAC] total counts (for size factors)


@dataclass
class Block:
    """CSR arrays of consecutive rows of one modality (indptr starts at 0)."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray  # int64


def _column(obs: zarr.Group, name: str) -> np.ndarray:
    """One obs column: the codes of a categorical (-1 = missing) or the plain array."""
    node = obs[name]
    if isinstance(node, zarr.Group):  # anndata writes categoricals as {codes, categories}
        return np.asarray(node["codes"][:])
    return np.asarray(node[:])


def as_store(store: Store | str | os.PathLike) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def read_split_hash(store: Store) -> np.ndarray:
    """uint64 ``split_hash`` of every cell (global row order), read shard by shard."""
    parts = [_column(store.shard_group(i)["obs"], "split_hash") for i in range(store.meta.n_shards)]
    return np.concatenate(parts).astype(np.uint64, copy=False)


def read_cell_table(store: Store) -> CellTable:
    """Compact per-cell arrays (see :class:`CellTable`) over all shards."""
    m = store.meta
    cols: dict[str, list[np.ndarray]] = {}
    names = [m.batch_key, *m.cat_cov_keys, *m.cont_cov_keys, "mask_rna", "mask_atac", "lib_rna", "lib_atac"]
    if m.label_key:
        names.append(m.label_key)
    for i in range(m.n_shards):
        obs = store.shard_group(i)["obs"]
        for name in names:
            if name not in obs:
                raise KeyError(f"{store.shard_path(i)}/obs has no column {name!r} (store schema mismatch)")
            cols.setdefault(name, []).append(_column(obs, name))
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    n = m.n_cells
    return CellTable(
        batch=cat[m.batch_key].astype(np.int32),
        cat_covs=(np.stack([cat[k].astype(np.int32) for k in m.cat_cov_keys], axis=1)
                  if m.cat_cov_keys else np.zeros((n, 0), np.int32)),
        cont_covs=(np.stack([cat[k].astype(np.float32) for k in m.cont_cov_keys], axis=1)
                   if m.cont_cov_keys else np.zeros((n, 0), np.float32)),
        label=cat[m.label_key].astype(np.int32) if m.label_key else None,
        mask=np.stack([cat["mask_rna"].astype(bool), cat["mask_atac"].astype(bool)], axis=1),
        library=np.stack([cat["lib_rna"], cat["lib_atac"]], axis=1).astype(np.float32),
    )


class ChunkReader:
    """Reads and caches whole plan chunks (shard-local contiguous row ranges) of both modalities."""

    def __init__(self, store: Store, chunk_starts: np.ndarray, chunk_stops: np.ndarray, *, cache_chunks: int,
                 modalities: tuple[str, ...] = keys.MODALITIES, threads: int = 4):
        self.store = store
        self.starts, self.stops = chunk_starts, chunk_stops
        self.offsets = np.asarray(store.meta.shard_offsets, dtype=np.int64)
        self.modalities = modalities
        self.cache_chunks = max(int(cache_chunks), 1)
        self._cache: OrderedDict[int, dict[str, Block]] = OrderedDict()
        self._arrays = {}  # (modality, shard) -> (data, indices, indptr) zarr arrays, opened once
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mva-read")

    def _zarr(self, modality: str, shard: int):
        key = (modality, shard)
        if key not in self._arrays:
            self._arrays[key] = self.store.csr_arrays(modality, shard)
        return self._arrays[key]

    def _read_chunk(self, chunk: int) -> dict[str, Block]:
        start = int(self.starts[chunk])
        shard = int(np.searchsorted(self.offsets, start, side="right") - 1)
        lo, hi = start - int(self.offsets[shard]), int(self.stops[chunk]) - int(self.offsets[shard])
        ptr_f = {m: self._pool.submit(lambda a: np.asarray(a[lo:hi + 1], np.int64), self._zarr(m, shard)[2])
                 for m in self.modalities}
        ptrs = {m: f.result() for m, f in ptr_f.items()}
        futs = {}
        for m in self.modalities:
            data, indices, _ = self._zarr(m, shard)
            a, b = int(ptrs[m][0]), int(ptrs[m][-1])
            futs[m] = (self._pool.submit(data.__getitem__, slice(a, b)),
                       self._pool.submit(indices.__getitem__, slice(a, b)))
        return {m: Block(np.asarray(fd.result()), np.asarray(fi.result()), ptrs[m] - ptrs[m][0])
                for m, (fd, fi) in futs.items()}

    def chunk(self, chunk: int) -> dict[str, Block]:
        hit = self._cache.get(chunk)
        if hit is not None:
            self._cache.move_to_end(chunk)
            return hit
        blocks = self._read_chunk(chunk)
        self._cache[chunk] = blocks
        while len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return blocks

    def gather(self, cells: np.ndarray) -> dict[str, Block]:
        """CSR rows of ``cells`` (sorted global indices) for each modality, in the order given."""
        cells = np.asarray(cells, dtype=np.int64)
        chunk_ids = np.searchsorted(self.starts, cells, side="right") - 1
        # Rows are sorted, so each chunk's rows form one run of the batch.
        bounds = np.flatnonzero(np.diff(chunk_ids)) + 1
        runs = np.split(np.arange(len(cells)), bounds)
        parts: dict[str, list[tuple[Block, np.ndarray]]] = {m: [] for m in self.modalities}
        for run in runs:
            if len(run) == 0:
                continue
            c = int(chunk_ids[run[0]])
            blocks = self.chunk(c)
            local = cells[run] - self.starts[c]
            for m in self.modalities:
                parts[m].append((blocks[m], local))
        return {m: _gather_rows(parts[m]) for m in self.modalities}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._cache.clear()


def _gather_rows(parts: list[tuple[Block, np.ndarray]]) -> Block:
    """Concatenate selected rows of several CSR blocks without a Python loop over rows."""
    lens, datas, idxs = [], [], []
    for block, rows in parts:
        starts = block.indptr[rows]
        n_row = block.indptr[rows + 1] - starts
        total = int(n_row.sum())
        # Position of every kept entry: each row's start, repeated per entry, plus the offset in the row.
        first = np.cumsum(n_row) - n_row
        pos = np.repeat(starts - first, n_row) + np.arange(total, dtype=np.int64)
        datas.append(block.data[pos])
        idxs.append(block.indices[pos])
        lens.append(n_row)
    n_row = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    indptr = np.zeros(len(n_row) + 1, dtype=np.int64)
    np.cumsum(n_row, out=indptr[1:])
    data = np.concatenate(datas) if datas else np.zeros(0, np.float32)
    indices = np.concatenate(idxs) if idxs else np.zeros(0, np.int64)
    return Block(data, indices, indptr)
