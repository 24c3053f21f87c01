"""Epoch start-up of the training loader's DataLoader workers: started every epoch vs once per run.

The trainer's loader (``trainer.streams.EpochLoader``) runs ``data.num_workers`` spawned worker processes.
Started anew for every epoch (``persistent_workers=False``, as before), each epoch's first batch waits for
an interpreter, a torch import, the unpickling of the stream (cell table, plan) and a store open per
worker; kept for the run (``persistent_workers=True``, now), only the first epoch pays, and the workers
follow the stream's epoch through shared memory (``StoreStream.share_position``). This measures the wall
time from ``iter(loader)`` to each epoch's first batch, and the next ``--batches`` batches, for both. It is
our loader alone: the reference (scvi-tools) has no streaming workers to compare with.

  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/worker_start.py --store outputs/bench/loader_1000000.zarr \\
      --workers 2 --epochs 3 --out outputs/bench/worker_start.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data import keys
from data.stream import StoreStream


def measure(store: str, workers: int, epochs: int, batch_size: int, batches: int, persistent: bool) -> list[dict]:
    stream = StoreStream(store, batch_size=batch_size, split="train", seed=0)
    ctx = torch.multiprocessing.get_context("spawn")
    if persistent:
        stream.share_position(ctx)
    dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4,
                                     persistent_workers=persistent, multiprocessing_context=ctx,
                                     generator=torch.Generator().manual_seed(0))
    rows = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        if persistent:
            stream.publish_position()
        t0 = time.perf_counter()
        it = iter(dl)
        first = next(it)
        t1 = time.perf_counter()
        n = 1
        for _ in range(batches):
            if next(it, None) is None:
                break
            n += 1
        rows.append({"persistent": persistent, "epoch": epoch, "first_batch_s": t1 - t0,
                     "next_batches": n - 1, "next_batches_s": time.perf_counter() - t1,
                     # which cells came first: the epoch the workers actually streamed (tests check it)
                     "first_cells": first[keys.INDEX].tolist()})
        del it
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=20, help="batches timed after each epoch's first")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.workers < 1 or a.epochs < 1:
        ap.error("--workers and --epochs must be >= 1")
    rows = [r for persistent in (False, True)
            for r in measure(a.store, a.workers, a.epochs, a.batch_size, a.batches, persistent)]
    print(f"| workers started | epoch | first batch after (s, wall) | next {a.batches} batches (s) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {'once per run' if r['persistent'] else 'every epoch'} | {r['epoch']} | {r['first_batch_s']:.2f} "
              f"| {r['next_batches_s']:.2f} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"store": a.store, "workers": a.workers, "batch_size": a.batch_size,
                                           "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
