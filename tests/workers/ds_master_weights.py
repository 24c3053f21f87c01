"""Worker for tests/test_deepspeed.py: DeepSpeed's fp32 master weights gathered for the export, 2 ranks.

    torchrun --standalone --nproc_per_node=2 tests/workers/ds_master_weights.py STORE OUT [fp32|bf16]

Under ZeRO 0, 1 and 2, after 3 steps every rank calls ``full_weights(master=True)``: the gather a bf16 run
exports from (ZeRO 1/2: an all-reduce of each parameter's partitions; ZeRO 0: FP16_UnfusedOptimizer's whole
copies). In fp32 the master copies equal the module's weights; in bf16 (a CPU with native bf16) the module's
weights are their bf16 roundings. Rank 0 records how far the gathered weights are from ``weights_of(module)``,
whether they have the same names, shapes and dtypes, and how many values are not bf16-representable (0 if the
export took the module's bf16 values). Rank r writes OUT.rank<r>.json.
"""

from __future__ import annotations

import json
import sys

import torch
from tiny_wrapped import deepspeed_stages

from data.collate import to_device
from trainer import dist
from trainer.export import weights_of
from trainer.guarded_step import train_one_step

BATCH = 16


def main() -> None:
    store, out = sys.argv[1], sys.argv[2]
    precision = sys.argv[3] if len(sys.argv) > 3 else "fp32"
    info = dist.init_distributed(120)
    res = {}
    for stage, stream, module, w, guard in deepspeed_stages(store, info, BATCH, precision):
        for step, b in zip(range(3), stream, strict=False):
            train_one_step(w, to_device(b, info.device), 1.0, None, guard, step)
        gathered = w.full_weights(master=True)
        linked = sum(hasattr(p, "_hp_mapping") for p in module.parameters())
        if info.rank == 0:
            plain = weights_of(module)
            params = [name for name, _ in module.named_parameters()]
            res[str(stage)] = {
                "same_keys": sorted(gathered) == sorted(plain),
                "same_layout": all(gathered[k].shape == plain[k].shape and gathered[k].dtype == torch.float32
                                   for k in plain),
                "max_abs_diff": max(float((gathered[k] - plain[k]).abs().max()) for k in plain),
                # |master - bf16(master)| <= 2**-9 |master|: the module's weights are the masters' roundings
                "max_rel_diff": max(float(((gathered[k] - plain[k]).abs() / gathered[k].abs().clamp_min(1e-30)).max())
                                    for k in params),
                "not_bf16": sum(int((gathered[k].bfloat16().float() != gathered[k]).sum()) for k in params),
                "n_values": sum(gathered[k].numel() for k in params),
                "module_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
                "linked_params": linked, "n_params": len(list(module.parameters())),
                "trained": float(sum(v.double().abs().sum() for v in gathered.values())),
            }
        else:
            res[str(stage)] = {"gathered": gathered, "linked_params": linked}
    with open(f"{out}.rank{info.rank}.json", "w") as fh:
        json.dump(res, fh)


if __name__ == "__main__":
    main()
