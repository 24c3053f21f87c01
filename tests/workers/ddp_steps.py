"""Worker for tests/test_ddp.py: training steps, either under torchrun (each rank its own StoreStream
shard, DDP) or in ONE process on the concatenation of what the ranks would read.

    torchrun --standalone --nproc_per_node=2 tests/workers/ddp_steps.py STORE OUT ddp STEPS
    python tests/workers/ddp_steps.py STORE OUT concat STEPS      # the 1-process reference
    torchrun --standalone --nproc_per_node=2 tests/workers/ddp_steps.py STORE OUT zero2 STEPS   # DeepSpeed ZeRO 2

STEPS: a number, or ``epoch`` for the whole first epoch (``remainder="even"``: its last step gives the
ranks batches that can differ by a cell; the ddp run writes that table as ``OUT/sizes.json``).
Dropout is off and the adversarial classifier is off (its batch norm sees per-rank statistics), and the
reparameterisation noise is keyed by (seed, step) over the global batch (``loop.step_noise``), so the
two runs must agree to float tolerance if DDP averages the gradients correctly, weighted by each rank's
share of the global batch (trainer/global_batch.py).
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file

from data import keys
from data.collate import to_device
from data.store import open_store
from data.stream import StoreStream
from trainer import dist
from trainer.config import load_config
from trainer.export import build_module, weights_of
from trainer.global_batch import EpochSlices
from trainer.guard import StepGuard
from trainer.guarded_step import train_one_step
from trainer.loop import seed_everything, step_noise
from trainer.parallel import wrap

BATCH = 32


def main(store_path: str, out: str, mode: str, steps: str) -> None:
    torch.set_num_threads(1)
    backend = {"dist": {"backend": "deepspeed", "zero_stage": int(mode[-1])}} if mode.startswith("zero") else {}
    cfg = load_config({"data": {"store": store_path, "batch_size": BATCH},
                       "model": {"n_hidden": 32, "n_latent": 6, "dropout_rate": 0.0},
                       "optim": {"adversarial": False, "lr": 1e-2, "n_epochs_kl_warmup": None}, **backend})
    info = dist.init_distributed(single_group=bool(backend))
    seed_everything(0)
    store = open_store(store_path)
    module = build_module(store.meta, cfg)
    w = wrap(module, None, cfg.optim, cfg.dist, info.device, BATCH)
    guard = StepGuard()
    if mode != "concat":
        streams = [StoreStream(store, BATCH, rank=info.rank, world_size=info.world_size, chunk_size=16, prefetch=0)]
    else:  # what ranks 0 and 1 of a 2-process run read, concatenated in rank order
        streams = [StoreStream(store, BATCH, rank=r, world_size=2, chunk_size=16, prefetch=0) for r in (0, 1)]
    slices = EpochSlices.of_stream(streams[0])  # every rank's sizes at every step of the 2-rank epoch
    if mode != "concat" and info.rank == 0:
        with open(f"{out}/sizes.json", "w") as fh:
            json.dump(slices.sizes.tolist(), fh)
    its = [iter(s) for s in streams]
    for step in range(len(streams[0]) if steps == "epoch" else int(steps)):
        parts = [next(it) for it in its]
        if len(parts) == 1:
            batch = to_device(parts[0], info.device)
            sl = slices.at(step, batch[keys.BATCH].shape[0])
            offset, total, share = sl.offset, sl.total, sl.share
        else:
            batch = {k: torch.cat([p[k].to_dense() if p[k].layout == torch.sparse_csr else p[k] for p in parts])
                     for k in parts[0]}
            offset, total, share = 0, batch[keys.BATCH].shape[0], None
        n = batch[keys.BATCH].shape[0]
        eps = step_noise(0, step, offset, n, total, module.n_latent, info.device)
        values = train_one_step(w, batch, 1.0, eps, guard, step, share)
        assert values is not None, "step unexpectedly skipped"
        if info.rank == 0:
            save_file(weights_of(module), f"{out}/{mode}_step{step}.safetensors")
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
