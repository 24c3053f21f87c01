"""Benchmark + sanity check for one accelerator: cells per second of our training step on the GPU.

Issue #4 asks for cells/s on one H100 with batch 1,024 in bf16 at 2,000 genes x 10,000 regions and at
20,000 x 100,000. This measures ``trainer.step.train_step`` (VAE AdamW step + classifier Adam step,
fused optimizers, CSR batches already on the device as the loader hands them over) per precision:

- ``fp32``: plain float32;
- ``amp_bf16``: what ``dist.precision=bf16`` with ``dist=ddp`` runs (autocast bf16, fp32 weights);
- a numerical check of the all-bf16 module that ``dist=deepspeed`` with bf16 trains: its loss (in
  float32, from bf16 weights) against the float32 module with the same weights, and a finite backward.

Wall-clock per step after warm-up, with ``torch.cuda.synchronize`` around the timed loop; peak device
memory per row. Needs only torch (``trainer.module`` / ``step`` / ``classifier`` and ``data.keys``
import nothing else), so it runs on a bare GPU machine from a checkout. ``--device cpu`` with small
sizes is the smoke test (tests/test_gpu_step_script.py).

Usage (GPU machine): ``python3 scripts/bench/gpu_step.py --out $OUT/gpu_step.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a bare checkout: no install
from step_batches import sparse, synthetic_batch

from trainer.classifier import build_classifier
from trainer.module import MultiVAE
from trainer.step import build_optimizers, train_step, vae_objective

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_batches(n: int, batch_size: int, genes: int, regions: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{k: v.to(device) for k, v in sparse(synthetic_batch(g, batch_size, genes, regions, 2)).items()}
            for _ in range(n)]


def time_steps(module, batches, amp, steps: int, warmup: int, device: torch.device) -> dict:
    cls = build_classifier(module)
    opts = build_optimizers(module, cls)
    for i in range(warmup):
        train_step(module, cls, *opts, batches[i % len(batches)], kl_weight=0.5, amp_dtype=amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        last = train_step(module, cls, *opts, batches[i % len(batches)], kl_weight=0.5, amp_dtype=amp)
    _sync(device)
    wall = time.perf_counter() - start
    cells = steps * batches[0]["batch"].shape[0]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"cells_per_s": cells / wall, "ms_per_step": wall / steps * 1e3, "peak_mem_mib": peak,
            "last_loss": last["loss"], "finite": all(math.isfinite(v) for v in last.values())}


def all_bf16_check(module: MultiVAE, batch: dict) -> dict:
    """The DeepSpeed-bf16 module (weights cast to bf16) scores like the fp32 one with the same weights."""
    m32 = copy.deepcopy(module).train()  # built with dropout_rate=0: both see the same network
    with torch.no_grad():
        for p in m32.parameters():
            p.copy_(p.bfloat16().float())
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    eps = torch.randn(batch["batch"].shape[0], module.n_noise, device=batch["batch"].device)
    ref = m32.loss(batch, 0.5, eps=eps)
    total, out, _ = vae_objective(m16, None, batch, 0.5, eps=eps)
    total.backward()
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in m16.parameters() if p.grad is not None)
    sums = {t: (getattr(out, t).detach().double().sum(), getattr(ref, t).detach().double().sum())
            for t in ("recon_rna", "recon_atac", "kl")}
    rel = {t: float((a - b).abs() / b.abs().clamp_min(1e-30)) for t, (a, b) in sums.items()}
    return {"loss_dtype": str(total.dtype), "rel_err_of_batch_sums": rel, "grads_finite": grads_finite}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="2000x10000,20000x100000", help="genes x regions, comma-separated")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", default="fp32,amp_bf16")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/gpu_step.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for size in args.sizes.split(","):
        genes, regions = (int(v) for v in size.lower().split("x"))
        batches = device_batches(2, args.batch_size, genes, regions, device)
        for mode in args.modes.split(","):
            amp = {"fp32": None, "amp_bf16": torch.bfloat16}[mode]
            torch.manual_seed(0)
            module = MultiVAE(genes, regions, n_batch=2).to(device).train()
            row = {"genes": genes, "regions": regions, "batch_size": args.batch_size, "mode": mode,
                   **time_steps(module, batches, amp, args.steps, args.warmup, device)}
            rows.append(row)
            print(f"{genes:>6} x {regions:<7} b{args.batch_size} {mode:9s} {row['cells_per_s']:>11,.0f} cells/s "
                  f"{row['ms_per_step']:8.2f} ms/step  peak {row['peak_mem_mib']:8.0f} MiB  finite {row['finite']}",
                  flush=True)
            del module
        torch.manual_seed(0)
        check = all_bf16_check(MultiVAE(genes, regions, n_batch=2, dropout_rate=0.0).to(device), batches[0])
        rows.append({"genes": genes, "regions": regions, "mode": "all_bf16_check", **check})
        print(f"{genes:>6} x {regions:<7} all-bf16 module (DeepSpeed bf16): {check}", flush=True)
        del batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"device": name, "torch": torch.__version__, "settings": vars(args) | {"out": str(args.out)},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
