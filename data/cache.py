"""Replay a finite, fixed-order stream from memory after its first full pass, if it fits a budget.

The validation pass reads the same cells in the same order every epoch, but they are spread over the
whole (preshuffled) store, so each pass decompresses every chunk of it: at 10,000 cells and batch 128
that was ~20 % of an epoch for ~1,000 held-out cells (docs/benchmarks.md). Kept in memory (as the
loader's CPU batches, counts still CSR) they cost ~8 MB there. A stream whose batches outgrow the
budget during the first pass is dropped from memory at once and simply streamed every time, so an
atlas-sized validation set costs at most the budget, transiently.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def batch_nbytes(batch: dict) -> int:
    """Bytes held by the tensors of one batch (CSR: row pointers, columns and values)."""
    total = 0
    for t in batch.values():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout == torch.sparse_csr:
            total += sum(p.numel() * p.element_size() for p in (t.crow_indices(), t.col_indices(), t.values()))
        else:
            total += t.numel() * t.element_size()
    return total


class ReplayCache:
    """Iterates ``source`` (which must yield the same batches every pass); from the second pass on,
    replays the first pass's batches from memory when they took at most ``limit_bytes``."""

    def __init__(self, source: Iterable[dict], limit_bytes: int):
        self.source, self.limit = source, int(limit_bytes)
        self.batches: list[dict] | None = None
        self.streaming = self.limit <= 0  # decided: too big (or caching off), always stream
        self.nbytes = 0

    def __iter__(self) -> Iterator[dict]:
        if self.batches is not None:
            yield from self.batches
            return
        if self.streaming:
            yield from self.source
            return
        kept: list[dict] | None = []
        size = 0
        for batch in self.source:
            if kept is not None:
                size += batch_nbytes(batch)
                if size > self.limit:
                    kept, self.streaming = None, True  # over budget: free what was kept, stream from now on
                else:
                    kept.append(batch)
            yield batch
        if kept is not None:  # only a complete pass is replayed (an abandoned one keeps nothing)
            self.batches, self.nbytes = kept, size
