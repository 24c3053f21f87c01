"""The training loop's data streams: one StoreStream per split and rank, and the DataLoader around it."""

from __future__ import annotations

import torch

from data import keys
from data.manifest import manifest_digest
from data.retry import add_stats
from data.stream import StoreStream
from trainer import dist
from trainer.checkpoint_checks import data_fingerprint
from trainer.config import ConfigError, TrainConfig


def make_stream(store, cfg: TrainConfig, split: str, info: dist.DistInfo) -> StoreStream:
    d = cfg.data
    stream = StoreStream(store, d.batch_size, split=split, shuffle=split == "train", seed=cfg.run.seed,
                         rank=info.rank, world_size=info.world_size, chunk_size=d.chunk_size,
                         window_chunks=d.window_chunks, val_fraction=d.val_fraction, prefetch=d.prefetch,
                         remainder=d.remainder if split == "train" else "none",
                         size_factor=cfg.model.use_size_factor)
    if split == "train":
        # Each rank opens data.store itself, on a cluster often a node-local copy: a stale or other copy on
        # one node would silently train on mixed cells (the plan hands out rows, not cell ids). The cells
        # on every row (stream fingerprint), the features and categories, and the files as built (manifest)
        # must be the same on every rank.
        mine = f"{stream.rows_fingerprint}:{data_fingerprint(stream.meta)}:{manifest_digest(stream.path)}"
        dist.check_same_everywhere(mine, f"data.store ({d.store})")
    return stream


class EpochLoader:
    """The training batches of the stream's current epoch, once per ``iter()``: from the stream itself with
    0 workers, else from DataLoader workers started once per run (``persistent_workers``).

    Workers are spawned processes: starting them costs an interpreter, a torch import and a store open
    each (10-13 s before the first batch of every epoch with 2 workers on the 2-core VM and a 1M-cell
    store, vs 0.14-0.7 s in-process; docs/benchmarks.md "Worker start-up per epoch"). Kept alive, they
    follow the stream's epoch and resume position through shared memory (``StoreStream.share_position``)."""

    def __init__(self, stream: StoreStream, cfg: TrainConfig) -> None:
        self.stream = stream
        self._dl = None
        if cfg.data.num_workers == 0:
            return
        # Its own generator: iter(DataLoader) draws the workers' base seed from the generator it is given,
        # by default the GLOBAL torch RNG, which also drives dropout. A mid-epoch checkpoint holds the RNG
        # after the epoch's draw and the resumed run drew once more: its dropout masks were shifted by one
        # draw (1e-2 off after a few steps). The stream's order never depends on the worker seed.
        stream.report_read_stats = True
        if not torch.sparse.check_sparse_tensor_invariants.is_enabled():
            # the workers' CSR batches are rebuilt here, and torch warns on every run that the (default, off)
            # invariant checks are "implicitly" off; our batches come from validated stores: off, explicitly
            torch.sparse.check_sparse_tensor_invariants.disable()
        ctx = torch.multiprocessing.get_context("spawn")
        stream.share_position(ctx)
        self._dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers,
                                               prefetch_factor=cfg.data.prefetch, persistent_workers=True,
                                               multiprocessing_context=ctx, worker_init_fn=dist.DieWithRank(),
                                               generator=torch.Generator().manual_seed(cfg.run.seed))

    def __iter__(self):
        if self._dl is None:
            return iter(self.stream)
        self.stream.publish_position()
        # iter(DataLoader) here, not at the first next(): it starts (or resumes) the workers, and the loop
        # clears the stream's resume position right after this call
        return _counting_reads(iter(self._dl))

    def close(self) -> None:
        """Stop the workers now (they would otherwise live until the loader is garbage-collected, holding
        their read pools through the export)."""
        if self._dl is not None and self._dl._iterator is not None:
            self._dl._iterator._shutdown_workers()  # torch's own shutdown (what its __del__ calls)
        self._dl = None


def _counting_reads(batches):
    """The workers' batches, with each one's read counters (keys.READ_STATS) added to this process's: a run with
    data.num_workers > 0 reported only the reads of the main process (11 retries where 102 happened)."""
    for batch in batches:
        counts = batch.pop(keys.READ_STATS, None)
        if counts is not None:
            add_stats(counts.tolist())
        yield batch


def check_last_batch(train_stream: StoreStream, cfg: TrainConfig, has_classifier: bool) -> None:
    """Refuse 1-cell training batches where batch norm trains on them: every batch at ``data.batch_size=1``,
    or the last one under ``data.remainder=none`` (one process only). Train-mode batch norm raises on a
    1-cell batch: the run crashed with a ValueError traceback at its first step (batch size 1) or at the
    end of its first epoch, after the whole epoch's compute (the reference warns, or moves the cell to
    validation)."""
    batch_norm = [what for what, on in (("the adversarial classifier's", has_classifier),
                                        (f"model.use_batch_norm={cfg.model.use_batch_norm}",
                                         cfg.model.use_batch_norm != "none")) if on]
    if not batch_norm:
        return
    if cfg.data.batch_size == 1:
        raise ConfigError(f"data.batch_size=1 makes every training batch 1 cell and batch norm "
                          f"({' and '.join(batch_norm)}) cannot train on one cell: use data.batch_size >= 2")
    if cfg.data.remainder == "none" and len(train_stream.plan().batches[-1]) == 1:
        raise ConfigError(f"data.remainder=none leaves a last training batch of 1 cell "
                          f"({train_stream.plan().n_cells} training cells, data.batch_size={cfg.data.batch_size}) "
                          f"and batch norm ({' and '.join(batch_norm)}) cannot train on one cell: use "
                          "data.remainder=even (or drop, pad), or a data.batch_size that does not leave 1 cell over")
