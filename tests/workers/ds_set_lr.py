"""Worker for tests/test_lr_plateau.py: ``Wrapped.set_lr`` reaches DeepSpeed's update, 2 ranks.

    torchrun --standalone --nproc_per_node=2 tests/workers/ds_set_lr.py STORE OUT [fp32|bf16]

Under ZeRO 0, 1 and 2 (fp32, or bf16 weights on a native-bf16 CPU): one step at the configured rate, then one at lr 0 (AdamW then
changes no weight, decay included) and one at 1e-2. Rank r writes OUT.rank<r>.json with the largest
weight change of each of the last two steps and the rate the wrapper reports.
"""

from __future__ import annotations

import json
import sys

import torch
from tiny_wrapped import deepspeed_stages

from data.collate import to_device
from trainer import dist
from trainer.guarded_step import train_one_step

BATCH = 16


def _snapshot(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _change(module, before) -> float:
    return max(float((p.detach() - b).abs().max()) for p, b in zip(module.parameters(), before, strict=True))


def main() -> None:
    store, out = sys.argv[1], sys.argv[2]
    precision = sys.argv[3] if len(sys.argv) > 3 else "fp32"
    info = dist.init_distributed(120)
    res = {}
    for stage, stream, module, w, guard in deepspeed_stages(store, info, BATCH, precision):
        batches = [to_device(b, info.device) for b, _ in zip(stream, range(3), strict=False)]
        train_one_step(w, batches[0], 1.0, None, guard, 0)
        w.set_lr(0.0)
        before = _snapshot(module)
        assert train_one_step(w, batches[1], 1.0, None, guard, 1) is not None
        at_zero = _change(module, before)
        reported = w.lr
        w.set_lr(1e-2)
        before = _snapshot(module)
        assert train_one_step(w, batches[2], 1.0, None, guard, 2) is not None
        res[str(stage)] = {"changed_at_lr_0": at_zero, "reported_lr": reported,
                           "changed_at_lr_1e-2": _change(module, before)}
    with open(f"{out}.rank{info.rank}.json", "w") as fh:
        json.dump(res, fh)


if __name__ == "__main__":
    main()
