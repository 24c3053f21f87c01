"""Worker for tests/test_deepspeed.py: the non-finite guard under DeepSpeed ZeRO 0, 1 and 2.

    torchrun --standalone --nproc_per_node=2 tests/workers/ds_guard.py STORE OUT

Rank 1 alone gets a NaN gradient (finite loss) at step 1. Every rank must skip that step (ZeRO 0: the
guard sees the all-reduced gradient norm before the step; ZeRO 1/2: DeepSpeed skips inside its step
and the loop counts it), leave the weights untouched, and take the good steps around it. Each rank
writes OUT.rank<r>.json.
"""

from __future__ import annotations

import json
import sys

import torch

from data.collate import to_device
from data.stream import StoreStream
from trainer import dist
from trainer.classifier import build_classifier
from trainer.config import load_config
from trainer.export import build_module
from trainer.guard import StepGuard
from trainer.loop import train_one_step
from trainer.parallel import wrap

BATCH = 16


def main() -> None:
    store, out = sys.argv[1], sys.argv[2]
    info = dist.init_distributed(120)
    res = {}
    for stage in (0, 1, 2):
        cfg = load_config({"data": {"store": store}, "model": {"n_hidden": 16, "n_latent": 4},
                           "dist": {"backend": "deepspeed", "zero_stage": stage}})
        torch.manual_seed(0)
        stream = StoreStream(store, BATCH, chunk_size=16, prefetch=0, rank=info.rank, world_size=info.world_size,
                             remainder="drop")
        module = build_module(stream.meta, cfg)
        w = wrap(module, build_classifier(module), cfg.optim, cfg.dist, info.device, BATCH)
        guard = StepGuard(max_bad_steps=5)
        steps = []
        for step, b in zip(range(3), stream, strict=False):
            before = [p.detach().clone() for p in module.parameters()]
            hook = None
            if step == 1 and info.rank == 1:
                hook = next(module.parameters()).register_hook(lambda g: g * float("nan"))
            r = train_one_step(w, to_device(b, info.device), 1.0, None, guard, step)
            if hook is not None:
                hook.remove()
            same = all(torch.equal(a, p.detach()) for a, p in zip(before, module.parameters(), strict=True))
            steps.append({"skipped": r is None, "unchanged": same})
        res[stage] = {"steps": steps, "skipped_total": guard.skipped_total,
                      "nan_params": sum(int(torch.isnan(p).any()) for p in module.parameters()),
                      "checksum": float(sum(p.detach().double().sum() for p in module.parameters()))}
    with open(f"{out}.rank{info.rank}.json", "w") as fh:
        json.dump(res, fh)


if __name__ == "__main__":
    main()
