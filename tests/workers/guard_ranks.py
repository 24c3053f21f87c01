"""Worker for tests/test_deepspeed.py and tests/test_ddp.py: the non-finite guard on 2 ranks.

    torchrun --standalone --nproc_per_node=2 tests/workers/guard_ranks.py STORE OUT [deepspeed|ddp] [fp32|bf16]

deepspeed (default): under ZeRO 0, 1 and 2, rank 1 alone gets a NaN gradient (finite loss) at step 1. Every
rank must skip that step (ZeRO 0: the guard sees the all-reduced gradient norm before the step; ZeRO 1/2:
DeepSpeed skips inside its step and the loop counts it), leave the weights untouched, and take the good
steps around it.
ddp: rank 1 alone gets a NaN input (a NaN loss) at step 1 and a NaN gradient (finite loss) at step 3; every
rank must skip both steps alike (a rank that skipped its backward alone would leave the other waiting in
DDP's gradient all-reduce).
deepspeed bf16 (a native-bf16 CPU): the same with bf16 weights (ZeRO 0 trains through DeepSpeed's
FP16_UnfusedOptimizer, and the guard reads the all-reduced bf16 gradients). Each rank writes OUT.rank<r>.json.
"""

from __future__ import annotations

import json
import sys

import torch
from tiny_wrapped import tiny_wrapped

from data.collate import to_device
from trainer import dist
from trainer.guard import StepGuard
from trainer.guarded_step import train_one_step

BATCH = 16


def main() -> None:
    store, out = sys.argv[1], sys.argv[2]
    backend = sys.argv[3] if len(sys.argv) > 3 else "deepspeed"
    precision = sys.argv[4] if len(sys.argv) > 4 else "fp32"
    runs = {"ddp": {"backend": "ddp"}} if backend == "ddp" else {
        str(stage): {"backend": "deepspeed", "zero_stage": stage, "precision": precision} for stage in (0, 1, 2)}
    faults = {1: "loss", 3: "grad"} if backend == "ddp" else {1: "grad"}  # step -> what goes bad on rank 1
    info = dist.init_distributed(120)
    res = {}
    for name, dist_cfg in runs.items():
        stream, module, w = tiny_wrapped(store, info, BATCH, dist_cfg)
        guard = StepGuard(max_bad_steps=5)
        steps = []
        for step, b in zip(range(max(faults) + 2), stream, strict=False):
            before = [p.detach().clone() for p in module.parameters()]
            b, hook, fault = to_device(b, info.device), None, faults.get(step) if info.rank == 1 else None
            if fault == "grad":
                hook = next(module.parameters()).register_hook(lambda g: g * float("nan"))
            if fault == "loss":
                b["rna"] = b["rna"].to_dense()
                b["rna"][0, 0] = float("nan")
            r = train_one_step(w, b, 1.0, None, guard, step)
            if hook is not None:
                hook.remove()
            same = all(torch.equal(a, p.detach()) for a, p in zip(before, module.parameters(), strict=True))
            steps.append({"skipped": r is None, "unchanged": same})
        res[name] = {"steps": steps, "skipped_total": guard.skipped_total,
                      "nan_params": sum(int(torch.isnan(p).any()) for p in module.parameters()),
                      "checksum": float(sum(p.detach().double().sum() for p in module.parameters()))}
    with open(f"{out}.rank{info.rank}.json", "w") as fh:
        json.dump(res, fh)


if __name__ == "__main__":
    main()
