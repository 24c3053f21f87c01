"""Inference benchmark: our mva-infer jobs vs scvi-tools 1.5.1 MULTIVI, same weights, same cells.

Comparison (50,000 cells, 2,000 genes, 10,000 peaks, mva-synth store; one torch thread; batch 1,024 on
both sides): for each job, the reference call and ours run in alternating child processes
(``--worker``), so each peak RSS (``ru_maxrss`` from ``wait4``) is that run's own:

  embed          scvi ``get_latent_representation()`` (joint)  vs  ``job=embed`` (joint + both
                 per-modality latents, all written to the AnnData Zarr: more work than the reference)
  expression     scvi ``get_normalized_expression()``            vs  ``job=expression`` (float32 Zarr)
  accessibility  scvi ``get_normalized_accessibility()``         vs  ``job=accessibility`` (float32 Zarr)

What is counted. Reference: ``load`` = reading the store's cells into an in-memory MuData, setup_mudata,
building MULTIVI and mapping our weights into it (trainer/scvi_io.py: store_to_mudata + scvi_model); ``compute`` = the accessor call
alone, its result left in RAM (``return_numpy=True``: no DataFrame wrap). Ours: the whole
``trainer.infer.infer(cfg)`` call = model load + store open + compute + writing the output to disk
(nothing is excluded, so the ratio is conservative). Python imports are reported apart for both.
cells/s = cells / wall seconds of that part; cells/CPU-s = cells / process CPU seconds (all threads)
of that part, the steadier number on a shared machine. The first 2,000 rows of both outputs are
compared (max abs difference) so the two sides provably computed the same thing.

Memory check: ours on the 1,000,000-cell store vs the 50,000-cell store with identical settings:
embed with its defaults (all cells, all three latents); expression / accessibility with a
``--subset``-feature output (the first N genes / regions, float32), because 1M x 10,000 float32 is
40 GB of disk. Every row is still decoded over all features: the subset only selects what is written.

Weights: ``--model`` (default outputs/bench/infer_model: a copy of the model that the 1M-cell training
benchmark trained for one epoch, outputs/bench/train_1m_run/model; if that is missing, one epoch on the
50k store is trained here). Speed does not depend on the weights.

  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/infer.py --repeat 2          # ~35 min on 2 busy cores
  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/infer.py --profile accessibility   # CPU per stage
  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/infer.py --jobs embed --large 0 --n-cells 5000  # smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # before the heavy imports: workers report their import time apart
os.environ.setdefault("OMP_NUM_THREADS", "1")
from bench_common import (
    BENCH,
    GENES,
    PEAKS,
    ROOT,
    cpu_s,
    ensure_model,
    ensure_store,
    run_worker,
    write_result,
)

sys.path.insert(0, str(ROOT))
JOBS = ("embed", "expression", "accessibility")
N_CHECK = 2000  # rows of each output compared between the two sides


# ----------------------------------------------------------------------------------- child workers
def _emit(res: dict) -> None:
    print("RESULT " + json.dumps(res), flush=True)


def _our_config(job: str, model: str, store: str, out: str, batch: int, subset: int):
    from data.store import open_store
    from trainer.infer_config import AccessibilityOptions, ExpressionOptions, InferConfig

    meta = open_store(store).meta
    kw = {}
    if job == "expression" and subset:
        kw["expression"] = ExpressionOptions(genes=list(meta.gene_names[:subset]))
    if job == "accessibility" and subset:
        kw["accessibility"] = AccessibilityOptions(regions=list(meta.region_names[:subset]))
    return InferConfig(model_dir=model, store=store, job=job, output=out, batch_size=batch, progress=False,
                       overwrite=True, **kw)


def _first_rows(out: str, job: str, n: int):
    """The first n rows of our output as a dense array (None if the layout is not a dense Zarr array)."""
    import numpy as np
    import zarr

    root = zarr.open_group(out, mode="r")
    name = "obsm/X_multivi" if job == "embed" else "X"
    if name not in root or not isinstance(root[name], zarr.Array):
        return None
    return np.asarray(root[name][:n], dtype=np.float32)


def worker_ours(job: str, model: str, store: str, out: str, batch: int, subset: int, check: str) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from trainer.infer import infer

    t_import = time.perf_counter() - T0
    cfg = _our_config(job, model, store, out, batch, subset)
    cpu0, wall0 = cpu_s(), time.perf_counter()
    summary = infer(cfg)
    wall, cpu = time.perf_counter() - wall0, cpu_s() - cpu0
    n = int(summary["n_cells"])
    if check:
        rows = _first_rows(out, job, N_CHECK)
        if rows is not None:
            np.save(check, rows)
    _emit({"side": "ours", "job": job, "cells": n, "import_s": t_import, "compute_s": wall, "compute_cpu_s": cpu,
           "loop_s": summary.get("seconds"), "cells_per_s": n / wall, "cells_per_cpu_s": n / cpu,
           "output_mb": sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 2**20})


def _reference_model(model_dir: str, store_path: str):
    """scvi MULTIVI on an in-memory MuData of every cell of the store (float32 CSR, as a user's MuData
    holds counts), with our weights mapped in (trainer.scvi_io)."""
    from trainer.export import load_model
    from trainer.scvi_io import scvi_model, store_to_mudata

    ours, info = load_model(model_dir)
    mdata = store_to_mudata(store_path)
    return scvi_model(ours, info, mdata), mdata.n_obs


def worker_reference(job: str, model_dir: str, store: str, batch: int, check: str) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import scvi  # noqa: F401  (its import is large: counted as import, not load)

    t_import = time.perf_counter() - T0
    cpu0, wall0 = cpu_s(), time.perf_counter()
    model, n = _reference_model(model_dir, store)
    load_s, load_cpu = time.perf_counter() - wall0, cpu_s() - cpu0
    torch.set_num_threads(1)
    cpu0, wall0 = cpu_s(), time.perf_counter()
    if job == "embed":
        out = model.get_latent_representation(batch_size=batch)
    elif job == "expression":
        out = model.get_normalized_expression(batch_size=batch, return_numpy=True)
    else:
        out = model.get_normalized_accessibility(batch_size=batch, return_numpy=True)
    wall, cpu = time.perf_counter() - wall0, cpu_s() - cpu0
    if check:
        np.save(check, np.asarray(out[:N_CHECK], dtype=np.float32))
    _emit({"side": "reference", "job": job, "cells": n, "import_s": t_import, "load_s": load_s, "load_cpu_s": load_cpu,
           "compute_s": wall, "compute_cpu_s": cpu, "cells_per_s": n / wall, "cells_per_cpu_s": n / cpu,
           "output_shape": list(np.shape(out))})


# ----------------------------------------------------------------------------------- stage profile
def _child(args: list[str], log: Path, timeout: float) -> dict:
    """Run one worker of this script in a fresh process (bench_common.run_worker)."""
    res = run_worker([sys.executable, str(Path(__file__).resolve()), *args], log)
    if "error" not in res and res["process_wall_s"] > timeout:
        res["note"] = f"ran longer than {timeout} s"
    return res


def _implemented(job: str) -> bool:
    return importlib.util.find_spec(f"trainer.jobs.{job}") is not None


def _compare(a: Path, b: Path) -> float | None:
    import numpy as np

    if not (a.is_file() and b.is_file()):
        return None
    x, y = np.load(a), np.load(b)
    return float(np.abs(x - y).max()) if x.shape == y.shape else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["ours", "reference"])
    ap.add_argument("--profile", choices=JOBS, help="print the per-stage CPU cost of one of our jobs and exit")
    ap.add_argument("--profile-batches", type=int, default=10)
    ap.add_argument("--job", choices=JOBS)
    ap.add_argument("--store")
    ap.add_argument("--output")
    ap.add_argument("--check", default="", help="worker: save the first rows of the result here (.npy)")
    ap.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    ap.add_argument("--n-cells", type=int, default=50_000, help="cells of the comparison store")
    ap.add_argument("--large", type=int, default=1_000_000, help="cells of the memory-check store (0 = skip)")
    ap.add_argument("--subset", type=int, default=100, help="features written by the memory check's "
                    "expression/accessibility runs (both store sizes)")
    ap.add_argument("--batch", type=int, default=1024, help="cells per forward pass, both sides")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved reference/ours pairs per job (best shown)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--model", default=str(BENCH / "infer_model"))
    ap.add_argument("--out", default=str(BENCH / "infer.json"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--work", default=str(BENCH / "infer_work"),
                    help="scratch dir for our outputs and logs (wiped at start): give two concurrent runs "
                         "different ones")
    a = ap.parse_args()
    if a.worker == "ours":
        return worker_ours(a.job, a.model, a.store, a.output, a.batch, a.subset, a.check)
    if a.worker == "reference":
        return worker_reference(a.job, a.model, a.store, a.batch, a.check)

    if a.profile:
        store = ensure_store(a.n_cells)
        ensure_model(Path(a.model), store)
        from infer_profile import print_profile

        return print_profile(a.profile, a.model, store, a.batch, a.profile_batches)

    small = ensure_store(a.n_cells)
    weights = ensure_model(Path(a.model), small)
    work = Path(a.work)  # outputs of ours (deleted after each run: 50k accessibility is 2 GB)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    res = {"n_cells": a.n_cells, "genes": GENES, "regions": PEAKS, "batch": a.batch, "weights": weights,
           "loadavg_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "compare": {}, "memory": {}}
    print(f"weights: {weights}; load average {res['loadavg_start']}", flush=True)

    def ours(job, store, subset, check=""):
        out = work / f"{job}_{Path(store).name}"
        r = _child(["--worker", "ours", "--job", job, "--model", a.model, "--store", str(store), "--output",
                    str(out), "--batch", str(a.batch), "--subset", str(subset), "--check", check],
                   work / f"ours_{job}_{Path(store).name}.log", a.timeout)
        shutil.rmtree(out, ignore_errors=True)
        return r

    def show(tag, r):
        if "error" in r:
            print(f"{tag:42s} ERROR {r['error']}", flush=True)
            return
        load = f", load {r['load_s']:.1f} s" if "load_s" in r else ""
        print(f"{tag:42s} {r['cells_per_s']:9.0f} cells/s {r['cells_per_cpu_s']:9.0f} cells/CPU-s  "
              f"compute {r['compute_s']:7.1f} s{load}  peak RSS {r['peak_rss_mib']:7.0f} MiB", flush=True)

    for job in a.jobs:
        sides = (["reference"] if not a.no_reference else []) + (["ours"] if _implemented(job) else [])
        runs = {s: [] for s in sides}
        for rep in range(a.repeat):
            for side in sides:
                check = str(work / f"{side}_{job}.npy") if rep == 0 else ""
                r = ours(job, small, 0, check) if side == "ours" else _child(
                    ["--worker", "reference", "--job", job, "--model", a.model, "--store", str(small),
                     "--batch", str(a.batch), "--check", check], work / f"reference_{job}.log", a.timeout)
                show(f"{job} {small.name} {side} #{rep + 1}", r)
                runs[side].append(r)
        # best of the repetitions, per metric (a run slowed by a neighbour's burst is not the one kept)
        ok = {s: [r for r in rr if "error" not in r] for s, rr in runs.items()}
        best = {s: {m: max(r[m] for r in rr) for m in ("cells_per_s", "cells_per_cpu_s")}
                | {"peak_rss_mib": max(r["peak_rss_mib"] for r in rr)} for s, rr in ok.items() if rr}
        entry = {"runs": runs, "best": best, "max_abs_diff_first_rows": _compare(work / f"reference_{job}.npy",
                                                                                  work / f"ours_{job}.npy")}
        if best.get("ours") and best.get("reference"):
            o, ref = best["ours"], best["reference"]
            entry["speedup"] = o["cells_per_s"] / ref["cells_per_s"]
            entry["speedup_cpu"] = o["cells_per_cpu_s"] / ref["cells_per_cpu_s"]
            entry["rss_ratio"] = o["peak_rss_mib"] / ref["peak_rss_mib"]
            print(f"{job}: ours/reference {entry['speedup']:.2f}x cells/s, {entry['speedup_cpu']:.2f}x cells/CPU-s "
                  f"(target >= 3x); peak RSS (highest) {o['peak_rss_mib']:.0f} vs {ref['peak_rss_mib']:.0f} MiB; "
                  f"max |diff| first {N_CHECK} rows {entry['max_abs_diff_first_rows']}", flush=True)
        elif "ours" not in sides:
            entry["ours"] = "job not implemented in this checkout"
        res["compare"][job] = entry

    if a.large:
        large = ensure_store(a.large)
        for job in a.jobs:
            if not _implemented(job):
                res["memory"][job] = "job not implemented in this checkout"
                continue
            subset = 0 if job == "embed" else a.subset
            got = {}
            for size, store in (("small", small), ("large", large)):  # same settings on both stores
                runs = [r for r in res["compare"].get(job, {}).get("runs", {}).get("ours", []) if "error" not in r]
                # the comparison's own runs have these settings already: keep the highest peak of them
                r = max(runs, key=lambda r: r["peak_rss_mib"]) if (size == "small" and subset == 0 and runs) \
                    else ours(job, store, subset)
                show(f"{job} {store.name} ours (memory check)", r)
                got[size] = r
            s, lg = got["small"], got["large"]
            entry = {"subset_features": subset or None, "small": s, "large": lg}
            if "error" not in s and "error" not in lg:
                entry["rss_growth"] = lg["peak_rss_mib"] / s["peak_rss_mib"] - 1
                print(f"{job}: peak RSS {a.large:,} cells {lg['peak_rss_mib']:.0f} MiB vs {a.n_cells:,} cells "
                      f"{s['peak_rss_mib']:.0f} MiB: {100 * entry['rss_growth']:+.1f} % (target within 10 %)",
                      flush=True)
            res["memory"][job] = entry
    write_result(res, a.out)


if __name__ == "__main__":
    main()
