"""Worker for tests/test_loop_edges.py: what the non-finite guard says when only rank 1 sees the NaN.

    torchrun --standalone --nproc_per_node=2 tests/workers/guard_names.py STORE OUT

vae: rank 1 alone gets a NaN count (a NaN recon_rna and loss) on every step; with max_bad_steps=2 the second
step stops the run on both ranks. classifier: rank 1 alone hands the adversarial classifier a latent with a
NaN, twice. Each rank writes OUT.rank<r>.json with the error message it raised and its guard history.
"""

from __future__ import annotations

import json
import sys

import torch
from tiny_wrapped import tiny_wrapped

from data.collate import to_device
from trainer import dist
from trainer.guard import NonFiniteError, StepGuard
from trainer.guarded_step import train_one_step

BATCH = 16


def main() -> None:
    store, out = sys.argv[1], sys.argv[2]
    info = dist.init_distributed(120)
    stream, module, w = tiny_wrapped(store, info, BATCH)
    batches = [to_device(b, info.device, dense=True) for b, _ in zip(stream, range(2), strict=False)]
    res = {}

    guard = StepGuard(max_bad_steps=2, last_good_checkpoint="/runs/x/checkpoints/step_000000007")
    try:
        for step, b in enumerate(batches, start=8):
            if info.rank == 1:
                b = dict(b, rna=b["rna"].clone())
                b["rna"][0, 0] = float("nan")
            train_one_step(w, b, 1.0, None, guard, step)
        res["vae"] = "no error"
    except NonFiniteError as exc:
        res["vae"] = str(exc)
    res["vae_history"] = guard.history

    guard = StepGuard(max_bad_steps=2)
    codes = batches[0]["batch"]
    try:
        for step in (20, 21):
            z = torch.randn(codes.shape[0], module.n_latent)
            if info.rank == 1:
                z[0, 0] = float("nan")
            w.classifier_step(z, codes, guard, step)
        res["classifier"] = "no error"
    except NonFiniteError as exc:
        res["classifier"] = str(exc)
    with open(f"{out}.rank{info.rank}.json", "w") as fh:
        json.dump(res, fh)
    dist.cleanup()


if __name__ == "__main__":
    main()
