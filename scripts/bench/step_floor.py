"""Benchmark: how much of ours' CPU training step is arithmetic and how much is per-op framework overhead.

Why: issue #4 asks for 3x the reference's cells per CPU-second at batch 128 on one thread. This script
measures the part of ours' step that no kernel work can remove. The same module built for 100 genes x
100 regions runs the same ops (counted, ``ops/step``) with next to no arithmetic, so its step time at
batch 8 is the per-step cost of Python, the dispatcher, autograd and the optimizer's bookkeeping. The
benchmark shape (2,000 genes x 10,000 regions, batch 128) minus that is what the arithmetic costs. A
torch-profiler pass splits the benchmark step into GEMMs, our C kernels (``trainer/native``), the fused
AdamW/Adam updates, and everything else.

With ``--epochs-json`` (a ``scripts/bench/train.py`` result at batch 128) it also prints what ours would
reach over whole epochs with zero framework overhead: the reference's CPU time per batch over ours'
minus the measured overhead. fp32, one torch thread, configurations timed in alternating chunks of 5
steps (CPU time, ``time.process_time``).

Usage: ``OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/step_floor.py --out outputs/bench/step_floor.json
[--epochs-json outputs/bench/train_fp32_4seeds_s6.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
from step_batches import sparse, synthetic_batch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.classifier import build_classifier
from trainer.module import MultiVAE
from trainer.step import build_optimizers, train_step

GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
OPTIM = {"aten::_fused_adamw_", "aten::_fused_adam_"}
NATIVE_PREFIXES = ("_CsrMatmul", "_ZinbNLL", "_ProductBernoulliLogitsNLL")


class _CountOps(TorchDispatchMode):
    """Counts the aten ops one step dispatches below autograd (what each costs per-op overhead)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def make_config(name: str, n_genes: int, n_regions: int, batch_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        batches = [sparse(synthetic_batch(g, batch_size, n_genes, n_regions, 2)) for _ in range(4)]
    torch.manual_seed(seed)
    module = MultiVAE(n_genes, n_regions, n_batch=2).train()
    cls = build_classifier(module)
    vae_opt, cls_opt = build_optimizers(module, cls)

    def step(b: dict) -> None:
        train_step(module, cls, vae_opt, cls_opt, b, kl_weight=0.5)

    return {"name": name, "genes": n_genes, "regions": n_regions, "batch_size": batch_size, "step": step,
            "batches": batches, "params": sum(p.numel() for p in module.parameters())}


def time_interleaved(configs: list[dict], warmup: int, steps: int, chunk: int = 5) -> None:
    """Mean CPU ms per step of each config (total CPU / steps), chunks of steps alternating between them."""
    for c in configs:
        for i in range(warmup):
            c["step"](c["batches"][i % 4])
        c["cpu"], c["done"] = 0.0, 0
    while min(c["done"] for c in configs) < steps:
        for c in configs:
            n = min(chunk, steps - c["done"])
            t = time.process_time()
            for i in range(c["done"], c["done"] + n):
                c["step"](c["batches"][i % 4])
            c["cpu"] += time.process_time() - t
            c["done"] += n
    for c in configs:
        c["ms_per_step"] = c["cpu"] / c["done"] * 1e3


def count_ops(c: dict) -> int:
    counter = _CountOps()
    with counter:
        c["step"](c["batches"][0])
    return counter.n


def split_by_kind(c: dict, steps: int = 8) -> dict[str, float]:
    """Self CPU ms per step by kind, from the torch profiler (its own overhead inflates 'other')."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            c["step"](c["batches"][i % 4])
    kinds = dict.fromkeys(("gemm", "native_kernels", "optimizer_update", "other"), 0.0)
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / steps / 1e3
        if e.key in GEMM:
            kinds["gemm"] += ms
        elif e.key.startswith(NATIVE_PREFIXES):
            kinds["native_kernels"] += ms
        elif e.key in OPTIM:
            kinds["optimizer_update"] += ms
        else:
            kinds["other"] += ms
    return kinds


def epoch_figures(path: str, overhead_ms: float) -> dict:
    """Whole-epoch figures of a train.py JSON at batch 128 and the zero-overhead ceiling they imply."""
    runs = json.loads(Path(path).read_text())["runs"]
    # one run per seed: a --check-repro repeat (key ..._repeat) would count its seed twice
    rate = {side: [r["cells_per_cpu_s"] for k, r in runs.items()
                   if k.startswith(f"{side}_b128_s") and not k.endswith("_repeat")]
            for side in ("reference", "ours")}
    if not rate["reference"] or not rate["ours"]:
        raise SystemExit(f"{path} has no batch-128 runs of both sides")
    mean = {side: sum(v) / len(v) for side, v in rate.items()}
    ms = {side: 128 / m * 1e3 for side, m in mean.items()}
    return {"json": path, "runs_per_side": len(rate["ours"]), "reference_cells_per_cpu_s": mean["reference"],
            "ours_cells_per_cpu_s": mean["ours"], "speedup": mean["ours"] / mean["reference"],
            "ours_ms_per_batch": ms["ours"], "reference_ms_per_batch": ms["reference"],
            "ceiling_without_overhead": ms["reference"] / (ms["ours"] - overhead_ms),
            "ms_per_batch_for_3x": ms["reference"] / 3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--regions", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--epochs-json", help="a scripts/bench/train.py JSON with batch-128 runs of both sides")
    ap.add_argument("--out", default="outputs/bench/step_floor.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    configs = [make_config("benchmark", a.genes, a.regions, a.batch_size),
               make_config("benchmark, batch 8", a.genes, a.regions, 8),
               make_config("tiny model, batch 8", 100, 100, 8)]
    time_interleaved(configs, a.warmup, a.steps)
    for c in configs:
        c["ops_per_step"] = count_ops(c)
    overhead = configs[2]["ms_per_step"]
    kinds = split_by_kind(configs[0])
    print(f"{'configuration':22s} {'genes':>6s} {'regions':>7s} {'batch':>5s} {'params':>9s} {'ops/step':>8s} "
          f"{'CPU ms/step':>11s}")
    for c in configs:
        print(f"{c['name']:22s} {c['genes']:6d} {c['regions']:7d} {c['batch_size']:5d} {c['params']:9,d} "
              f"{c['ops_per_step']:8d} {c['ms_per_step']:11.2f}")
    arith = configs[0]["ms_per_step"] - overhead
    print(f"per-step framework overhead (tiny model): {overhead:.2f} ms; arithmetic of the benchmark step: "
          f"{arith:.2f} ms")
    print("benchmark step by kind (profiler self CPU ms/step): "
          + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
    out = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "threads": torch.get_num_threads(), "steps": a.steps, "loadavg": os.getloadavg(),
           "rows": [{k: c[k] for k in ("name", "genes", "regions", "batch_size", "params", "ops_per_step",
                                        "ms_per_step")} for c in configs],
           "overhead_ms": overhead, "arithmetic_ms": arith, "by_kind_ms": kinds}
    if a.epochs_json:
        ep = epoch_figures(a.epochs_json, overhead)
        out["epochs"] = ep
        print(f"whole epochs ({ep['runs_per_side']} runs per side): ours {ep['ours_ms_per_batch']:.1f} ms per batch, "
              f"reference {ep['reference_ms_per_batch']:.1f} ({ep['speedup']:.2f}x); 3x needs "
              f"{ep['ms_per_batch_for_3x']:.1f} ms; with zero framework overhead ours would be "
              f"{ep['ours_ms_per_batch'] - overhead:.1f} ms: {ep['ceiling_without_overhead']:.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
