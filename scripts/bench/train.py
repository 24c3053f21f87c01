"""Benchmark: whole-epoch training, ours (streaming from the store) vs scvi-tools 1.5.1 MULTIVI
(in-memory MuData), side by side on the same cells.

Sizes: 2,000 genes, 10,000 peaks, 50 % paired / 25 % RNA-only / 25 % ATAC-only (mva-synth), 2 batches
(adversarial classifier on in both), reference hyper-parameters (AdamW 1e-4, KL warm-up 50 epochs),
one torch thread, batch 128 and 1024. Each side runs in a fresh process, so peak RSS (ru_maxrss) is
its own. Reported per side:
  * cells per CPU-second over whole epochs (training cells seen / CPU time of the training call: the
    process's threads plus its child processes; the native kernels' one-off compile is done before
    ours' timer, as the one-off imports are on both sides). Neither side validates inside the timed
    call (the reference trains with train_size=1.0; ours with run.validate_every_epochs=0;
    ``--validate`` puts ours' per-epoch pass back in). Ours still writes its per-epoch checkpoints
    and the exported model (the reference writes neither), so the ratio is conservative;
  * peak RSS up to the end of the training call (data loading and set-up included; not the held-out
    evaluation after it, whose batches of 512 can exceed training at batch 128: the whole worker's
    peak is kept as ``peak_rss_process_mib``);
  * held-out ELBO (per cell) on the same held-out cells (the store's hash split) after the same
    number of epochs, computed by ONE evaluator for both (our module with the reference's weights
    mapped in by trainer/reference.py, same noise), plus the reference's own ``get_elbo``.

Seeds: ``--seeds 0,1,2,3,4`` runs both sides once per seed (the reference with ``scvi.settings.seed = s``
set before its model is built, ours with ``run.seed = s``) on the same cells and split, and reports per
seed, each side's mean +- standard error (and sd) of the held-out ELBO, and the paired difference
ours - reference (mean +- s.e., with a t 95 % interval, also relative to the reference's mean), from
which the 1 % target is decided (``train_summary.decide``). Speed and peak RSS are aggregated over seeds (mean,
min, max). ``--check-repro`` runs both sides a second time with the first seed (same seed twice must give
the same held-out ELBO). ``--jobs 2`` runs two workers at a time: the ELBO does not depend on it, but the
speed figures then share the cores (they are secondary in that mode).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/train.py            # batch 128 + 1024, seed 0
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/train.py --seeds 0,1,2,3,4 --check-repro --jobs 2
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/train.py --precision bf16   # ours under CPU bf16 autocast
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/train.py --n-cells 4000 --epochs 1 --batch-sizes 512 \
        --seeds 0,1 --store outputs/bench/train_store_smoke --out outputs/bench/train_smoke.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))  # also when loaded from its file (tests/test_bench_train.py)
from train_summary import SIDES, print_summary, summarise


def _cpu_s() -> float:
    """CPU seconds of this process (all threads) plus its waited-for child processes (a compiler, loader
    workers): what the training call costs, counted the same way on both sides."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _peak_rss_mib() -> float:
    """This process's peak RSS so far (ru_maxrss): read right after the training call, it is the
    training's peak (data loading and set-up included), not that of the held-out evaluation after it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _store_arrays(store_path: str):
    """All cells of the store as scipy CSR (RNA, ATAC) + batch codes + validation flags, in store order."""
    import numpy as np
    import scipy.sparse as sp

    from data.cell_table import read_validation_mask
    from data.store import open_store
    from data.stream import StoreStream

    store = open_store(store_path)
    mats = {"rna": [], "atac": []}
    batch = []
    for b in StoreStream(store, 4096, split="all", shuffle=False, prefetch=0):
        for m, parts in mats.items():
            t = b[m]
            parts.append(sp.csr_matrix((t.values().numpy(), t.col_indices().numpy(), t.crow_indices().numpy()),
                                         shape=tuple(t.shape)))
        batch.append(b["batch"].numpy())
    return (store, sp.vstack(mats["rna"]).tocsr(), sp.vstack(mats["atac"]).tocsr(), np.concatenate(batch),
            read_validation_mask(store, 0.1))


def _evaluate(module, store_path: str, batch_size: int = 512) -> float:
    """Held-out ELBO per cell with our evaluator (fixed noise seed, so both sides see the same draws)."""
    import torch

    from data.store import open_store
    from data.stream import StoreStream
    from trainer.loop import validate

    torch.manual_seed(1234)
    stream = StoreStream(open_store(store_path), batch_size, split="validation", shuffle=False, val_fraction=0.1)
    return validate(module, stream, torch.device("cpu"), 1.0)["elbo_validation"]


def worker_ours(store: str, batch_size: int, epochs: int, out_dir: str, seed: int, remainder: str,
                validate: bool = False, precision: str = "fp32") -> dict:
    import torch

    torch.set_num_threads(1)
    # torch.optim's first step imports torch._dynamo (~0.8 CPU-s, once per process); the reference paid
    # it inside `import scvi`, before its timer, so ours pays it here too, outside the timed call
    import torch._dynamo

    from trainer import native
    from trainer.config import load_config
    from trainer.export import load_model
    from trainer.train import train

    # remainder="none" (default): a short last batch, exactly the reference's drop_last=False, so both
    # sides take the same steps on the same cells per epoch; "pad" fills it up with repeated cells
    cfg = load_config({"data": {"store": store, "batch_size": batch_size, "chunk_size": 256, "remainder": remainder},
                       # no validation pass by default: the reference's run (train_size=1.0) has none either
                       "run": {"epochs": epochs, "output_dir": out_dir, "resume": "none", "early_stopping": False,
                               "keep_checkpoints": 1, "seed": seed, "validate_every_epochs": int(validate)},
                       "logger": {"log_every": 10**9, "plot": False}, "dist": {"precision": precision}})
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run each time (resume=none refuses old checkpoints)
    # the native kernels' one-off compile (~0.6 CPU-s in a child process, once per machine and kernels.c)
    # is set-up like the import above: done here if the cache lacks it; loading and self-check stay timed
    cc = native._compiler()
    if cc is not None and native.enabled_by_env():
        try:
            native._build(cc)
        except (OSError, RuntimeError, subprocess.SubprocessError):
            pass  # train() warns and runs the eager likelihoods
    cpu0, wall0 = _cpu_s(), time.perf_counter()
    res = train(cfg)
    cpu, wall = _cpu_s() - cpu0, time.perf_counter() - wall0
    peak_train = _peak_rss_mib()
    module, _ = load_model(res.model_dir)
    from data.cell_table import read_validation_mask
    from data.store import open_store

    # cells actually seen: with remainder=none the last batch is short, so steps * batch_size over-counts
    n_train = int((~read_validation_mask(open_store(store), 0.1)).sum())
    cells = n_train * epochs if remainder == "none" else res.steps * batch_size
    return {"cells_trained": cells, "cpu_s": cpu, "wall_s": wall, "cells_per_cpu_s": cells / cpu,
            "heldout_elbo": _evaluate(module, store), "steps": res.steps, "peak_rss_train_mib": peak_train}


def worker_reference(store_path: str, batch_size: int, epochs: int, seed: int, precision: str = "fp32") -> dict:
    import anndata as ad
    import mudata as md
    import pandas as pd
    import scvi
    import torch

    from trainer.config import load_config
    from trainer.export import build_module
    from trainer.reference import ours_state_from_reference

    store, rna, atac, batch, val = _store_arrays(store_path)
    meta = store.meta
    obs = pd.DataFrame({"batch": pd.Categorical([meta.batch_categories[b] for b in batch])},
                       index=[f"c{i}" for i in range(len(batch))])

    def mudata(rows, rna, atac):
        o = obs.iloc[rows]
        return md.MuData({"rna": ad.AnnData(rna[rows], obs=o.copy(), var=pd.DataFrame(index=meta.gene_names)),
                          "atac": ad.AnnData(atac[rows], obs=o.copy(), var=pd.DataFrame(index=meta.region_names))})

    import numpy as np

    train_m, held_m = mudata(np.flatnonzero(~val), rna, atac), mudata(np.flatnonzero(val), rna, atac)
    # the store-wide CSR copies are the harness's, not the reference's (its MuData above holds copies of
    # the rows): freed before training, else they sit in its peak RSS (ours holds nothing like them)
    del rna, atac
    for m in (train_m, held_m):
        scvi.model.MULTIVI.setup_mudata(m, modalities={"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"},
                                        batch_key="batch")
    torch.set_num_threads(1)
    # seeds python, numpy and torch (Lightning's seed_everything): initial weights, shuffling, dropout and
    # the reparameterisation noise of the reference's run all follow from it
    scvi.settings.seed = seed
    model = scvi.model.MULTIVI(train_m)
    cpu0, wall0 = _cpu_s(), time.perf_counter()
    # bf16: Lightning's "bf16-mixed" (torch.autocast on the CPU, as ours' dist.precision=bf16 does)
    extra = {"precision": "bf16-mixed"} if precision == "bf16" else {}
    model.train(max_epochs=epochs, batch_size=batch_size, train_size=1.0, early_stopping=False,
                accelerator="cpu", devices=1, enable_progress_bar=False, datasplitter_kwargs={"drop_last": False},
                **extra)
    cpu, wall = _cpu_s() - cpu0, time.perf_counter() - wall0
    peak_train = _peak_rss_mib()
    cells = int((~val).sum()) * epochs
    ref_elbo = float(model.get_elbo(adata=held_m, batch_size=512))
    # same evaluator as ours: the reference's weights mapped into our module
    out = {"cells_trained": cells, "cpu_s": cpu, "wall_s": wall, "cells_per_cpu_s": cells / cpu,
           "heldout_elbo_scvi_get_elbo": ref_elbo, "steps": epochs * -(-int((~val).sum()) // batch_size),
           "peak_rss_train_mib": peak_train}
    cfg = load_config({"data": {"store": store_path}})
    ours = build_module(meta, cfg)
    try:
        ours.load_state_dict(ours_state_from_reference(model.module.state_dict(), ours.state_dict()))
        out["heldout_elbo"], out["evaluator"] = _evaluate(ours, store_path), "ours"
    except RuntimeError as exc:  # weight mapping out of date with the module: use scvi's own number
        # (both evaluators agreed to < 0.01 % when the mapping worked; get_elbo returns -ELBO's sign-flip)
        out["heldout_elbo"], out["evaluator"] = abs(ref_elbo), f"scvi get_elbo (mapping failed: {str(exc)[:80]})"
    return out


def _training_peak(r: dict) -> dict:
    """A worker's result with ``peak_rss_mib`` (what the tables print) = its training call's peak; the
    whole worker's (wait4: also the held-out evaluation after training, e.g. scvi's get_elbo, which
    alone can exceed the reference's training peak at batch 128) is kept as ``peak_rss_process_mib``."""
    r["peak_rss_process_mib"] = r["peak_rss_mib"]
    r["peak_rss_mib"] = r["peak_rss_train_mib"]
    return r


def _worker_cmd(a, side: str, bs: int, seed: int, tag: str) -> list[str]:
    return [sys.executable, __file__, "--worker", side, "--batch-size", str(bs), "--epochs", str(a.epochs),
            "--store", a.store, "--seed", str(seed), "--remainder", a.remainder, *(["--validate"] if a.validate else []),
            "--precision", a.precision, "--ref-precision", a.ref_precision,
            "--run-dir", f"{a.store}_run_e{a.epochs}_b{bs}_s{seed}{tag}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-cells", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2,3,4")
    ap.add_argument("--check-repro", action="store_true", help="run both sides twice with the first seed")
    ap.add_argument("--jobs", type=int, default=1, help="workers at a time (speed figures share the cores if > 1)")
    ap.add_argument("--remainder", choices=["none", "pad"], default="none", help="ours' last partial batch")
    ap.add_argument("--validate", action="store_true",
                    help="ours also runs its per-epoch validation pass inside the timed call (the reference has none)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="ours' dist.precision (bf16: autocast on a CPU with native bf16 GEMMs; the reference "
                         "stays fp32, so a bf16 run is a reduced-precision comparison, not the fp32 one)")
    ap.add_argument("--ref-precision", choices=["fp32", "bf16"], default="fp32",
                    help="the reference's precision (bf16: Lightning 'bf16-mixed', autocast on the CPU): with "
                         "--precision bf16 both sides run reduced precision")
    ap.add_argument("--store", default="outputs/bench/train_store")
    ap.add_argument("--out", default="outputs/bench/train.json")
    ap.add_argument("--reuse", action="store_true", help="keep the runs already in --out (same settings)")
    ap.add_argument("--reuse-from", nargs="*", default=[], help="also keep the runs of these JSONs (same settings)")
    ap.add_argument("--worker", choices=SIDES)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir")
    a = ap.parse_args()
    if a.worker:  # one side in a fresh process: print its JSON (the driver adds its own peak RSS)
        if a.worker == "ours":
            r = worker_ours(a.store, a.batch_size, a.epochs, a.run_dir, a.seed, a.remainder, a.validate,
                            a.precision)
        else:
            r = worker_reference(a.store, a.batch_size, a.epochs, a.seed, a.ref_precision)
        r["peak_rss_mb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(r), flush=True)
        return

    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds needs distinct seeds (use --check-repro to repeat one), got {a.seeds!r}")
    if a.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {a.jobs}")
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_common import run_worker

    from data.synthetic import write_synthetic_store

    if not (Path(a.store) / "zarr.json").is_file():
        write_synthetic_store(a.store, n_cells=a.n_cells, n_genes=2000, n_regions=10000, paired_fraction=0.5,
                              rna_only_fraction=0.25, atac_only_fraction=0.25, progress=False, overwrite=True)
    from data.store import open_store

    n_store = open_store(a.store).meta.n_cells
    if n_store != a.n_cells:  # an existing store is reused as it is: say so rather than mislabel the results
        raise SystemExit(f"{a.store} holds {n_store} cells, not --n-cells {a.n_cells}: pass --n-cells {n_store} "
                         "or another --store")
    settings = {"n_cells": a.n_cells, "epochs": a.epochs, "genes": 2000, "regions": 10000, "store": a.store,
                "remainder": a.remainder, "ours_validates": a.validate,
                # runs of JSONs whose peak RSS included the held-out evaluation are not mixed in (--reuse)
                "peak_rss": "training call"}
    if a.precision != "fp32":  # only then: JSONs of earlier fp32 runs stay reusable
        settings["ours_precision"] = a.precision
    if a.ref_precision != "fp32":
        settings["ref_precision"] = a.ref_precision
    results = {**settings, "python": platform.python_version(), "machine": platform.machine(), "runs": {},
               "loadavg_start": os.getloadavg(), "jobs": a.jobs}
    out = Path(a.out)
    for prev in ([out] if a.reuse and out.is_file() else []) + [Path(p) for p in a.reuse_from]:
        old = json.loads(prev.read_text())
        bad = [k for k, v in settings.items() if old.get(k) != v]
        if bad:
            raise SystemExit(f"--reuse: {prev} was written with other settings ({', '.join(bad)}); use another --out")
        results["runs"].update(old["runs"])
    # interleaved: for each seed both sides back to back, so slow drifts of the load hit both alike
    tasks = [(side, bs, s, "") for bs in a.batch_sizes for s in seeds for side in SIDES]
    if a.check_repro:
        tasks += [(side, bs, seeds[0], "_repeat") for bs in a.batch_sizes[:1] for side in SIDES]
    tasks = [t for t in tasks if f"{t[0]}_b{t[1]}_s{t[2]}{t[3]}" not in results["runs"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.with_suffix("").with_name(out.stem + "_logs")

    def one(task):
        side, bs, s, tag = task
        key = f"{side}_b{bs}_s{s}{tag}"
        t0 = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
        r = run_worker(_worker_cmd(a, side, bs, s, tag), log=logs / f"{key}.log", env=env)
        if "error" in r:
            raise SystemExit(f"{key} failed: {r['error']}")
        r = _training_peak(r)
        r["loadavg_end"], r["started"] = os.getloadavg(), time.strftime("%H:%M:%S", time.gmtime(t0))
        return key, r

    with ThreadPoolExecutor(a.jobs) as pool:
        for key, r in pool.map(one, tasks):
            results["runs"][key] = r
            out.write_text(json.dumps(results, indent=1))  # partial results survive an interrupted run
            print(f"{key:24s}: held-out ELBO {r['heldout_elbo']:9.2f}, {r['cells_per_cpu_s']:6.0f} cells/CPU-s, "
                  f"peak RSS {r['peak_rss_mib']:5.0f} MiB, {r['steps']} steps, load {r['loadavg_end'][0]:.1f}",
                  flush=True)
    results["loadavg_end"] = os.getloadavg()
    for bs in a.batch_sizes:
        sm = summarise(results["runs"], bs, seeds)
        sm["_per_seed"] = {s: (results["runs"][f"reference_b{bs}_s{s}"]["heldout_elbo"],
                               results["runs"][f"ours_b{bs}_s{s}"]["heldout_elbo"]) for s in seeds}
        print_summary(bs, sm)
        results[f"summary_b{bs}"] = sm
    if a.check_repro:
        bs, s = a.batch_sizes[0], seeds[0]
        for side in SIDES:
            x, y = (results["runs"][f"{side}_b{bs}_s{s}{t}"]["heldout_elbo"] for t in ("", "_repeat"))
            results[f"repro_{side}"] = {"first": x, "repeat": y, "rel_diff": (y - x) / abs(x)}
            print(f"reproducibility, {side} batch {bs} seed {s}: {x:.6f} then {y:.6f} "
                  f"(relative difference {(y - x) / abs(x):+.1e})")
    print(f"load average: start {results['loadavg_start']}, end {results['loadavg_end']}")
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
