"""de / da benchmark: ``mva-infer job=de`` / ``job=da`` vs scvi-tools 1.5.1 MULTIVI, same weights, same store.

Comparison (default: the 50,000-cell mva-synth store of the loader / inference benchmarks, 2,000 genes,
10,000 regions, 6 cell types; one torch thread; batch 1,024 and 5,000 samples per group on both sides):

  de   every listed group (default type_0..type_5) against the rest: the reference
       ``differential_expression(groupby=..., group1=[g])`` once per group  vs  one ``job=de`` call
  da   one group (default type_0) against the rest: ``differential_accessibility``  vs  ``job=da``

The reference is called once per group for both jobs because its DA fails with several groups.
Each run is a fresh child process (``--worker``), reference and ours alternating (reference, ours,
reference, ours, ...), so the peak RSS (``ru_maxrss`` from ``wait4``) is that run's own and load
changes hit both sides alike.

What is counted. Reference: ``setup`` = reading the store's counts into an in-memory MuData,
setup_mudata, building MULTIVI with our weights (trainer/scvi_io.py: store_to_mudata + scvi_model), reported apart; ``wall`` = the
differential calls alone, from the ready MuData (this favours the reference). Ours: ``wall`` = the
whole ``trainer.infer.infer(cfg)`` call (model load, obs, raw pass, sampling, decoding, statistics,
writing the table). ``ref/ours`` = reference wall / our wall of the same repetition.

Weights: ``--model`` (default outputs/bench/infer_model, shared with scripts/bench/infer.py, which
copies or trains it if missing; so does this script, through the same helper).

  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/infer_de.py --repeat 2           # ~10 min on 2 busy cores
  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/infer_de.py --jobs da --repeat 2
  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/infer_de.py --n-cells 2000 --n-samples 200 \\
      --de-groups type_0 --repeat 1 --out outputs/bench/infer_de_smoke.json       # smoke, < 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
from bench_common import BENCH, ROOT, ensure_model, ensure_store, run_worker, write_result

sys.path.insert(0, str(ROOT))
WORK = BENCH / "infer_de_work"  # our tables (deleted after each run)


# ----------------------------------------------------------------------------------- child worker
def worker(side: str, job: str, groups: list[str], model: str, store: str, batch: int, n_samples: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    setup = 0.0
    t0 = time.perf_counter()
    if side == "ours":
        from trainer.infer import infer
        from trainer.infer_config import DiffOptions, InferConfig

        WORK.mkdir(parents=True, exist_ok=True)
        out = WORK / f"{job}_{os.getpid()}.csv"
        infer(InferConfig(model_dir=model, store=store, job=job, output=str(out), overwrite=True, progress=False,
                          batch_size=batch,
                          de=DiffOptions(groupby="cell_type", group1=groups, n_samples_overall=n_samples)))
        wall = time.perf_counter() - t0
        out.unlink(missing_ok=True)
    else:
        from trainer.export import load_model
        from trainer.scvi_io import scvi_model, store_to_mudata

        module, info = load_model(model)
        ref = scvi_model(module, info, store_to_mudata(store))  # obs incl. cell_type
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        np.random.seed(0)
        fn = ref.differential_expression if job == "de" else ref.differential_accessibility
        for g in groups:  # the reference's DA fails with several groups: one call per group, both jobs
            fn(groupby="cell_type", group1=[g], silent=True, batch_size=batch, n_samples_overall=n_samples)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "setup_s": setup,
            "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------------- driver
def _child(args: list[str], log: Path, timeout: float) -> dict:
    """Run one worker of this script in a fresh process (bench_common.run_worker)."""
    res = run_worker([sys.executable, str(Path(__file__).resolve()), *args], log)
    if "error" not in res and res["wall_s"] + res["setup_s"] > timeout:
        res["note"] = f"ran longer than {timeout} s"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["ours", "reference"])
    ap.add_argument("--job", choices=["de", "da"])
    ap.add_argument("--groups", help="worker: comma-separated cell types")
    ap.add_argument("--store", help="worker: store path")
    ap.add_argument("--jobs", nargs="+", choices=["de", "da"], default=["de", "da"])
    ap.add_argument("--de-groups", default="type_0,type_1,type_2,type_3,type_4,type_5",
                    help="cell types tested (each against the rest) by de")
    ap.add_argument("--da-groups", default="type_0", help="cell types tested (each against the rest) by da")
    ap.add_argument("--n-cells", type=int, default=50_000, help="cells of the mva-synth store "
                    "(outputs/bench/loader_<n>.zarr, written if missing)")
    ap.add_argument("--n-samples", type=int, default=5000, help="n_samples_overall, both sides")
    ap.add_argument("--batch", type=int, default=1024, help="cells per forward pass, both sides")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved reference/ours pairs per job")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--model", default=str(BENCH / "infer_model"))
    ap.add_argument("--out", default=str(BENCH / "infer_de.json"))
    ap.add_argument("--timeout", type=float, default=3600, help="a run longer than this is flagged")
    a = ap.parse_args()
    if a.worker:
        res = worker(a.worker, a.job, a.groups.split(","), a.model, a.store, a.batch, a.n_samples)
        print("RESULT " + json.dumps(res), flush=True)
        return

    store = ensure_store(a.n_cells)
    weights = ensure_model(Path(a.model), store)
    res = {"store": str(store.relative_to(ROOT)), "n_cells": a.n_cells, "batch": a.batch, "n_samples": a.n_samples,
           "weights": weights, "loadavg_start": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": [], "ratios": {}}
    print(f"store {store.name}; weights: {weights}; load average {res['loadavg_start']}", flush=True)
    print(f"{'job':4s} {'side':10s} {'rep':>3s} {'wall s':>8s} {'setup s':>8s} {'peak RSS MiB':>12s} {'load':>5s}")
    sides = (["reference"] if not a.no_reference else []) + ["ours"]
    for job in a.jobs:
        groups = a.de_groups if job == "de" else a.da_groups
        for rep in range(a.repeat):
            got = {}
            for side in sides:
                r = _child(["--worker", side, "--job", job, "--groups", groups, "--model", a.model,
                            "--store", str(store), "--batch", str(a.batch), "--n-samples", str(a.n_samples)],
                           WORK / f"{side}_{job}.log", a.timeout)
                r.update(side=side, job=job, groups=groups, rep=rep + 1, load=os.getloadavg()[0])
                res["runs"].append(r)
                got[side] = r
                if "error" in r:
                    print(f"{job:4s} {side:10s} {rep + 1:3d} ERROR {r['error']}", flush=True)
                    continue
                print(f"{job:4s} {side:10s} {rep + 1:3d} {r['wall_s']:8.1f} {r['setup_s']:8.1f} "
                      f"{r['peak_rss_mib']:12.0f} {r['load']:5.1f}", flush=True)
            if all(s in got and "error" not in got[s] for s in ("reference", "ours")):
                ratio = got["reference"]["wall_s"] / got["ours"]["wall_s"]
                with_setup = (got["reference"]["wall_s"] + got["reference"]["setup_s"]) / got["ours"]["wall_s"]
                res["ratios"].setdefault(job, []).append({"ref_over_ours": ratio, "with_setup": with_setup})
                print(f"{job:4s} rep {rep + 1}: reference/ours {ratio:.2f}x compute only, {with_setup:.2f}x with "
                      f"the reference's setup", flush=True)
    write_result(res, a.out)


if __name__ == "__main__":
    main()
