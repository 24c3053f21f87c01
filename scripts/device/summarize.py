"""Summary of ``scripts/device/check.sh``: one JSON with every step's exit status and seconds, each training run's
result and last records, and the GPU-vs-CPU comparison of the embedding (the same model and cells).

    python3 scripts/device/summarize.py --steps OUT/steps.tsv --work WORK --out OUT/summary.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# what to keep of a run's last train / validation record (the rest is in its metrics.jsonl)
TRAIN_KEYS = ("step", "epoch", "loss", "recon_rna", "recon_atac", "kl", "grad_norm", "lr", "cells_per_s",
              "data_wait_s", "skipped_steps", "classifier_skipped_steps", "mem_gpu_mb", "mem_rss_mb")


def read_steps(path: Path) -> dict:
    steps = {}
    for line in path.read_text().splitlines():
        name, rc, ms = line.split("\t")
        steps[name] = {"rc": int(rc), "seconds": int(ms) / 1000}
    return steps


def run_summary(run_dir: Path) -> dict | None:
    if not (run_dir / "metrics.jsonl").exists():
        return None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "validation"]
    out = {"n_train_records": len(train), "n_validations": len(val),
           "lr_by_validation": [r.get("lr") for r in val],
           "last_train": {k: train[-1].get(k) for k in TRAIN_KEYS} if train else None,
           "last_validation": val[-1] if val else None,
           "peak_cells_per_s": max((r.get("cells_per_s") or 0 for r in train), default=None)}
    if (run_dir / "result.json").exists():
        out["result"] = json.loads((run_dir / "result.json").read_text())
    return out


def compare_embeddings(a: Path, b: Path) -> dict | None:
    """Largest difference between two embed outputs' latents (obsm), absolute and relative to the scale."""
    if not (a.exists() and b.exists()):
        return None
    import anndata as ad
    import numpy as np

    x, y = ad.read_zarr(a), ad.read_zarr(b)
    out = {"n_cells": int(x.n_obs), "same_cells": bool((x.obs_names == y.obs_names).all())}
    for key in x.obsm:
        u, v = np.asarray(x.obsm[key], dtype=np.float64), np.asarray(y.obsm[key], dtype=np.float64)
        diff = float(np.abs(u - v).max())
        out[key] = {"max_abs_diff": diff, "rel_to_max_abs": diff / max(float(np.abs(v).max()), 1e-30),
                    "finite": bool(np.isfinite(u).all())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    summary = {"steps": read_steps(a.steps),
               "runs": {name: run_summary(a.work / name) for name in ("ddp", "ds", "ds_cpu")},
               "embed_gpu_vs_cpu": compare_embeddings(a.work / "embed_gpu.zarr", a.work / "embed_cpu.zarr"),
               "sample_gpu_vs_cpu": compare_embeddings(a.work / "sample_gpu.zarr", a.work / "sample_cpu.zarr")}
    if (a.work / "api.json").exists():
        summary["api_gpu_vs_cpu"] = json.loads((a.work / "api.json").read_text())
    expr = a.work / "expr_gpu.zarr"
    if expr.exists():
        import anndata as ad

        e = ad.read_zarr(expr)
        summary["expression"] = {"shape": list(e.shape), "dtype": str(e.X.dtype)}
    summary["all_ok"] = all(s["rc"] == 0 for s in summary["steps"].values())
    a.out.write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary["steps"]))


if __name__ == "__main__":
    main()
