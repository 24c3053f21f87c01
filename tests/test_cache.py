"""data.cache.ReplayCache: the validation batches replayed from memory are the streamed ones, bit for
bit; a set over budget is never kept; and a training run validates the same with and without it."""

from __future__ import annotations

import torch

from data.cache import ReplayCache, batch_nbytes
from data.stream import StoreStream
from tests.train_utils import tiny_config, tiny_store
from trainer.metrics import read_metrics
from trainer.train import train


class CountingStream:
    """A fixed-order source that counts how often it is read."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        yield from self.batches


def same(a: dict, b: dict) -> bool:
    def dense(t):
        return t.to_dense() if t.layout == torch.sparse_csr else t

    return a.keys() == b.keys() and all(torch.equal(dense(a[k]), dense(b[k])) for k in a)


def test_replays_a_real_validation_stream_bit_for_bit(tmp_path):
    store = tiny_store(tmp_path / "store", n_cells=600)
    stream = StoreStream(store, 32, split="validation", shuffle=False, prefetch=2)
    cache = ReplayCache(stream, 2**30)
    first, second, third = list(cache), list(cache), list(cache)
    assert first and all(same(a, b) and same(a, c) for a, b, c in zip(first, second, third, strict=True))
    assert cache.batches is not None and cache.nbytes == sum(batch_nbytes(b) for b in first)
    assert all(same(a, b) for a, b in zip(second, list(stream), strict=True))  # what streaming gives


def test_over_budget_streams_every_time_and_keeps_nothing():
    batches = [{"x": torch.zeros(10, 10)} for _ in range(5)]  # 400 bytes each
    src = CountingStream(batches)
    cache = ReplayCache(src, 1000)
    for _ in range(3):
        assert len(list(cache)) == 5
    assert src.passes == 3 and cache.batches is None and cache.streaming
    fits = CountingStream(batches)
    cache = ReplayCache(fits, 2000)
    for _ in range(3):
        assert len(list(cache)) == 5
    assert fits.passes == 1
    off = CountingStream(batches)
    for _ in range(2):
        list(ReplayCache(off, 0))
    assert off.passes == 2


def test_an_abandoned_pass_is_not_replayed():
    src = CountingStream([{"x": torch.full((2,), float(i))} for i in range(4)])
    cache = ReplayCache(src, 2**20)
    it = iter(cache)
    next(it)
    it.close()
    assert cache.batches is None
    assert [float(b["x"][0]) for b in cache] == [0.0, 1.0, 2.0, 3.0] and cache.batches is not None


def test_training_validates_the_same_with_and_without_the_cache(tmp_path):
    store = tiny_store(tmp_path / "store")
    runs = {}
    for mb in (64, 0):
        run = tmp_path / f"run{mb}"
        train(tiny_config(store, run, **{"run.epochs": 3, "data.cache_validation_mb": mb}))
        runs[mb] = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "validation"]
    assert len(runs[64]) == 3
    keys = ("reconstruction_loss_validation", "elbo_validation", "n_validation")
    assert [[r[k] for k in keys] for r in runs[64]] == [[r[k] for k in keys] for r in runs[0]]
