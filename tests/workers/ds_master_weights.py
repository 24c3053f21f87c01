"""Worker for tests/test_deepspeed.py: DeepSpeed's fp32 master weights gathered for the export, 2 ranks.

    torchrun --standalone --nproc_per_node=2 tests/workers/ds_master_weights.py STORE OUT

Under ZeRO 0, 1 and 2 (fp32 on the CPU), after 3 steps every rank calls ``full_weights(master=True)``:
the gather a bf16 run on a GPU exports from (ZeRO 1/2: an all-reduce of each parameter's partitions).
Here the master copies equal the module's fp32 weights, so rank 0 records how far the gathered weights
are from ``weights_of(module)`` and whether they have the same names, shapes and dtypes.
Rank r writes OUT.rank<r>.json.
"""

from __future__ import annotations

import json
import sys

import torch
from tiny_wrapped import deepspeed_stages

from data.collate import to_device
from trainer import dist
from trainer.export import weights_of
from trainer.loop import train_one_step

BATCH = 16


def main() -> None:
    store, out = sys.argv[1], sys.argv[2]
    info = dist.init_distributed(120)
    res = {}
    for stage, stream, module, w, guard in deepspeed_stages(store, info, BATCH):
        for step, b in zip(range(3), stream, strict=False):
            train_one_step(w, to_device(b, info.device), 1.0, None, guard, step)
        gathered = w.full_weights(master=True)
        linked = sum(hasattr(p, "_hp_mapping") for p in module.parameters())
        if info.rank == 0:
            plain = weights_of(module)
            res[str(stage)] = {
                "same_keys": sorted(gathered) == sorted(plain),
                "same_layout": all(gathered[k].shape == plain[k].shape and gathered[k].dtype == torch.float32
                                   for k in plain),
                "max_abs_diff": max(float((gathered[k] - plain[k]).abs().max()) for k in plain),
                "linked_params": linked, "n_params": len(list(module.parameters())),
                "trained": float(sum(v.double().abs().sum() for v in gathered.values())),
            }
        else:
            res[str(stage)] = {"gathered": gathered, "linked_params": linked}
    with open(f"{out}.rank{info.rank}.json", "w") as fh:
        json.dump(res, fh)


if __name__ == "__main__":
    main()
