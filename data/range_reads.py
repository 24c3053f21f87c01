"""Many row ranges of zarr arrays in few calls: the loader's read round.

zarr turns every ``array[a:b]`` into its own codec-pipeline call; at 256-row chunks and four arrays per
chunk that per-request cost was most of the loader's CPU. ``fetch_all`` hands zarr the ranges of one
array at once (one pipeline call through zarrs), with the retried per-range read as the fallback.
"""

from __future__ import annotations

import asyncio

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.indexing import BasicIndexer, ChunkProjection

from data import retry
from data.retry import read_slice


class _Ranges:
    """A zarr ``Indexer`` for several ``[a, b)`` ranges of one 1-D array, concatenated in the output.

    zarr turns every ``array[a:b]`` into its own codec-pipeline call (indexer, chunk specs, a thread
    hand-off, one Rust call): ~0.2-0.3 ms of CPU per request here, which at 256-row chunks and four
    arrays per chunk was most of the loader's CPU. Handing zarr the projections of all the ranges of a
    read round at once makes that one pipeline call (zarrs then decodes the pieces in parallel)."""

    def __init__(self, arr: zarr.Array, ranges: list[tuple[int, int]]):
        self._arr, self.ranges = arr._async_array, ranges
        self.shape = (sum(b - a for a, b in ranges),)
        self.drop_axes: tuple[int, ...] = ()

    def __iter__(self):
        off, shape, grid = 0, self._arr.shape, self._arr.metadata.chunk_grid
        for a, b in self.ranges:
            for p in BasicIndexer(slice(a, b), shape, grid):
                o = p.out_selection[0]
                yield ChunkProjection(p.chunk_coords, p.chunk_selection, (slice(o.start + off, o.stop + off, 1),),
                                      p.is_complete_chunk)
            off += b - a


def _batchable(arr: zarr.Array) -> bool:
    """Whether ranges of ``arr`` are read as one call: only through the zarrs pipeline (one Rust call; the
    per-request overhead is what it saves). zarr's Python pipeline (a ``RetryingStore``, forked workers)
    keeps one retried read per range, so store-level retries and fault injection count as before."""
    return type(arr._async_array.codec_pipeline).__name__ == "ZarrsCodecPipeline"


async def _read_ranges(arr: zarr.Array, ranges: list[tuple[int, int]]) -> list:
    """``[arr[a:b] for a, b in ranges]``, in one zarr pipeline call where possible (views of one array).

    A failed call counts as one retried read and falls back to one retried read per range
    (``data.retry.read_slice``): a range that stays unreadable raises ``StoreReadError`` naming it."""
    if len(ranges) > 1 and _batchable(arr):
        try:
            out = np.asarray(await arr._async_array._get_selection(_Ranges(arr, ranges),
                                                                   prototype=default_buffer_prototype()))
        except (OSError, RuntimeError):  # zarrs reports I/O and decode failures as RuntimeError
            retry.count_retry()
        else:
            bounds = np.cumsum([0] + [b - a for a, b in ranges])
            return [out[bounds[k]:bounds[k + 1]] for k in range(len(ranges))]
    return list(await asyncio.gather(*[read_slice(arr, a, b) for a, b in ranges]))


async def fetch_all(requests: list[tuple[zarr.Array, int, int]]) -> list:
    """Read ``array[a:b]`` for every request, concurrently on zarr's event loop, in request order.

    The requests of one array (a modality's data or indices in one shard) go to zarr as one read."""
    by_array: dict[int, tuple[zarr.Array, list[int]]] = {}
    for k, (arr, a, b) in enumerate(requests):
        if not 0 <= a <= b <= arr.shape[0]:
            # zarr clips a slice past the end as numpy does: the caller would get fewer entries than it
            # asked for and misalign the rows after them, silently
            raise ValueError(f"read of [{a}, {b}) outside {arr.path or 'array'} (length {arr.shape[0]})")
        by_array.setdefault(id(arr), (arr, []))[1].append(k)
    groups = list(by_array.values())
    parts = await asyncio.gather(*[_read_ranges(arr, [requests[k][1:] for k in ks]) for arr, ks in groups])
    out: list = [None] * len(requests)
    for (_, ks), arrays in zip(groups, parts, strict=True):
        for k, a in zip(ks, arrays, strict=True):
            out[k] = a
    return out
