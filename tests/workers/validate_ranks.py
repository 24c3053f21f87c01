"""Worker for tests/test_loop_edges.py: the trainer's validation over 2 ranks against one process.

    torchrun --standalone --nproc_per_node=2 tests/workers/validate_ranks.py STORE OUT VAL_FRACTION

A VAE with batch norm (model.use_batch_norm=both) takes 2 DDP steps (each rank its own batches, so each
rank's running statistics move differently), then ``trainer.validation.validate`` runs on both ranks as the
loop calls it. Rank 0 then scores every validation cell itself, in one process, with its own weights and
statistics (those the run checkpoints and exports) and each cell's own posterior noise
(``validation.cell_noise``, keyed by the cell, not by its rank or batch), so the two must agree to float
rounding. Rank 0 writes OUT.json with both results and each rank's validation cell count.
"""

from __future__ import annotations

import json
import sys

import torch

from data.collate import to_device
from data.stream import StoreStream
from trainer import dist
from trainer.config import load_config
from trainer.export import build_module
from trainer.guard import StepGuard
from trainer.guarded_step import train_one_step
from trainer.parallel import wrap
from trainer.validation import cell_noise, validate

BATCH = 16


def one_process_sums(module, store, val_fraction: float) -> dict[str, float]:
    module.eval()
    recon, n = 0.0, 0
    with torch.no_grad():
        for b in StoreStream(store, BATCH, split="validation", shuffle=False, chunk_size=16, prefetch=0,
                             val_fraction=val_fraction):
            out = module.loss(to_device(b, "cpu"), kl_weight=1.0, eps=cell_noise(7, b["index"], module.n_latent))
            recon += float((out.recon_rna + out.recon_atac).double().sum())
            n += out.recon_rna.shape[0]
    module.train()
    return {"reconstruction_loss_validation": recon / n, "n_validation": n}


def main() -> None:
    store, out, val_fraction = sys.argv[1], sys.argv[2], float(sys.argv[3])
    info = dist.init_distributed(120)
    cfg = load_config({"data": {"store": store, "val_fraction": val_fraction},
                       "model": {"n_hidden": 16, "n_latent": 4, "use_batch_norm": "both"},
                       "optim": {"adversarial": False}, "run": {"early_stopping": False}})
    torch.manual_seed(0)
    kw = {"chunk_size": 16, "prefetch": 0, "rank": info.rank, "world_size": info.world_size,
          "val_fraction": val_fraction}
    train = StoreStream(store, BATCH, **kw)
    module = build_module(train.meta, cfg)
    w = wrap(module, None, cfg.optim, cfg.dist, info.device, BATCH)
    guard = StepGuard()
    for step, b in zip(range(2), train, strict=False):
        assert train_one_step(w, to_device(b, info.device), 1.0, None, guard, step) is not None
    val = StoreStream(store, BATCH, split="validation", shuffle=False, **kw)
    mine = sum(b["index"].shape[0] for b in val)
    got = validate(module, val, info.device, 1.0, seed=7)
    counts: list = [None] * info.world_size
    torch.distributed.all_gather_object(counts, mine)
    if info.is_main:
        expected = one_process_sums(module, store, val_fraction)
        with open(f"{out}.json", "w") as fh:
            json.dump({"ranks": got, "one_process": expected, "cells_per_rank": counts}, fh)
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    main()
