"""Loader benchmark: cells/s and peak RSS of StoreStream vs scvi-tools' AnnDataLoader vs annbatch.

Every measurement runs in its own child process (``--worker ...``), so peak RSS (``ru_maxrss`` from
``wait4``) is that loader's own. Shuffled RNA + ATAC minibatches of 128 and 1,024 cells from a synthetic
store (2,000 genes x 10,000 peaks). Our stream yields sparse CSR tensors (the model's input); scvi's
AnnDataLoader yields what MULTIVI trains on (dense tensors of the in-memory MuData); annbatch (Python
3.12 only: ``.venv-annbatch``) streams the same cells stored as one genes-then-peaks matrix in its own
sharded format. Every loader's consumer sums the counts of each batch in the form it yields them (what
the model's first layer reads anyway): without touching the data, a dense batch whose pages the kernel
has not yet faulted in looks free, and the comparison would flatter whoever allocates lazily. The
memory check streams the 1,000,000-cell store and the 50,000-cell store with the
same settings and compares peak RSS. Ours uses the store's default chunking (mva-synth stores record
``preshuffled``: 1,024-row chunks, 4 per window) and, as ``ours-c256``, the 256-row x 16 chunking of
stores that do not. Every row also has the process CPU time of its loop (``cells_per_cpu_s``).
``--codecs lz4,none,zstd`` streams ours from one store per count-array codec (docs/store.md; the same
cells: mva-synth, same seed), interleaved with the other loaders; lz4 is the existing
``loader_<n>.zarr``, the others are written once as ``loader_<n>_<codec>.zarr`` (never the shared ones).
scvi and annbatch read the lz4 store (their own in-memory / own-format copies do not depend on it).

  .venv/bin/python scripts/bench/loader.py --out outputs/bench/loader.json
  .venv/bin/python scripts/bench/loader.py --small 20000 --large 0 --repeat 1   # quick, no 1M store
  .venv/bin/python scripts/bench/loader.py --codecs lz4,none,zstd --variant 0 --out outputs/bench/loader_codec.json
Stores are created under outputs/bench/ if missing (the 1M store takes a few minutes) and kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_common import BENCH, GENES, PEAKS, ROOT, ensure_store, run_worker

ANNBATCH_PY = ROOT / ".venv-annbatch" / "bin" / "python"


# ----------------------------------------------------------------------------------- child workers
def _result(n_cells: int, seconds: float, cpu_s: float, **extra) -> None:
    # cpu_s: process CPU time (all threads) of the counted loop; less sensitive than wall time to the
    # other engineers' jobs on the shared cores
    print("RESULT " + json.dumps({"cells": n_cells, "seconds": seconds, "cells_per_s": n_cells / seconds,
                                  "cpu_s": cpu_s, "cells_per_cpu_s": n_cells / max(cpu_s, 1e-9), **extra}))


def worker_ours(store: str, batch: int, max_cells: int, chunk_size: int | None = None,
                window_chunks: int | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from data.stream import StoreStream

    stream = StoreStream(store, batch, split="train", shuffle=True, seed=0, chunk_size=chunk_size,
                         window_chunks=window_chunks)
    n, epoch, total = 0, 0, 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    while n < max_cells:  # several epochs when the store is smaller than max_cells
        stream.set_epoch(epoch)
        for b in stream:
            n += len(b["index"])
            total += float(b["rna"].values().sum()) + float(b["atac"].values().sum())
            if n >= max_cells:
                break
        epoch += 1
        if max_cells >= 10**9:
            break
    _result(n, time.perf_counter() - t0, time.process_time() - c0, epochs=epoch, count_sum=total,
            nnz_per_cell=(b["rna"].values().numel() + b["atac"].values().numel()) / len(b["index"]),
            chunk_size=stream.chunk_size, window_chunks=stream.window_chunks)


def _load_mudata(store: str, max_cells: int):
    import anndata as ad
    import mudata as md
    import scipy.sparse as sp

    sys.path.insert(0, str(ROOT))
    from data.store import open_store

    st = open_store(store)
    obs = st.read_obs()
    n = min(max_cells, st.meta.n_cells)
    mats = {}
    for mod in ("rna", "atac"):
        parts, got = [], 0
        for s in range(st.meta.n_shards):
            size = st.meta.shard_offsets[s + 1] - st.meta.shard_offsets[s]
            take = min(size, n - got)
            if take <= 0:
                break
            parts.append(st.read_rows(mod, s, 0, take).astype("float32"))
            got += take
        mats[mod] = sp.vstack(parts, format="csr")
    obs = obs.iloc[:n].copy()
    return md.MuData({m: ad.AnnData(X=x, obs=obs) for m, x in mats.items()}), st.meta.batch_key


def worker_scvi(store: str, batch: int, max_cells: int) -> None:
    import torch

    torch.set_num_threads(1)
    import scvi

    mdata, batch_key = _load_mudata(store, max_cells)
    scvi.model.MULTIVI.setup_mudata(mdata, batch_key=batch_key,
                                    modalities={"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"})
    manager = scvi.model.MULTIVI._get_most_recent_anndata_manager(mdata, required=True)
    loader = scvi.dataloaders.AnnDataLoader(manager, batch_size=batch, shuffle=True)
    n, total = 0, 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for b in loader:
        n += len(b["X"])
        total += float(b["X"].sum()) + float(b["atac"].sum())
        if n >= max_cells:
            break
    _result(n, time.perf_counter() - t0, time.process_time() - c0, count_sum=total)


def worker_annbatch(store: str, batch: int, max_cells: int) -> None:
    """Runs under .venv-annbatch (Python 3.12, no torch): annbatch's own sharded copy of the cells."""
    import annbatch
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})  # annbatch's fast path
    copy = Path(store).with_suffix(".annbatch.zarr")
    if not copy.exists():
        root = zarr.open_group(store, mode="r")
        parts = []
        for name in sorted(root["shards"].keys()):
            g = root[f"shards/{name}/mod"]
            x = [ad.io.read_elem(g[f"{m}/X"]) for m in ("rna", "atac")]
            parts.append(sp.hstack(x, format="csr").astype(np.float32))
        X = sp.vstack(parts, format="csr")
        adata = ad.AnnData(X=X)
        annbatch.write_sharded(zarr.open_group(str(copy), mode="w"), adata)
        del X, adata, parts
    ds = ad.io.sparse_dataset(zarr.open_group(str(copy), mode="r")["X"])
    # The stack notes' settings: 64-row chunks, 32 chunks preloaded and shuffled together.
    loader = annbatch.Loader(batch_size=batch, chunk_size=64, preload_nchunks=32, shuffle=True)
    loader.add_dataset(ds)
    n, total = 0, 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for b in loader:
        x = b["X"] if isinstance(b, dict) else (b[0] if isinstance(b, tuple) else b)
        n += x.shape[0]
        total += float(x.data.sum()) if hasattr(x, "data") else float(x.sum())
        if n >= max_cells:
            break
    _result(n, time.perf_counter() - t0, time.process_time() - c0, count_sum=total)


# ----------------------------------------------------------------------------------- driver
def codec_store(n_cells: int, codec: str) -> Path:
    """The bench store of ``n_cells`` cells written with count-array ``codec`` (same cells as lz4's)."""
    if codec == "lz4":  # the shared store every other benchmark uses (lz4 = the writer's default)
        return ensure_store(n_cells)
    path = BENCH / f"loader_{n_cells}_{codec}.zarr"
    if not (path / "zarr.json").exists():
        print(f"writing synthetic store {path} ...", flush=True)
        subprocess.run([sys.executable, "-m", "data.synthetic", f"out={path}", f"n_cells={n_cells}",
                        f"n_genes={GENES}", f"n_regions={PEAKS}", f"codec={codec}", "overwrite=true",
                        "progress=false"], cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return path


def _du_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _measure(python, loader, store, batch, max_cells, extra: tuple[str, ...] = ()) -> dict:
    # a fresh process per measurement: peak RSS is this child's own (bench_common.run_worker)
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", loader, "--store", str(store),
           "--batch", str(batch), "--max-cells", str(max_cells), *extra]
    res = run_worker(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    row = {"loader": loader + ("-c" + extra[1] if extra else ""), "batch": batch, "store": Path(store).name}
    if loader == "ours":
        sys.path.insert(0, str(ROOT))
        from data.store import open_store

        row["loader"] += f"[{open_store(store).meta.codec}]"
    res.pop("process_wall_s", None)
    row.update(res)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["ours", "scvi", "annbatch"])
    ap.add_argument("--store")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--max-cells", type=int, default=10**9)
    ap.add_argument("--chunk-size", type=int, default=None, help="ours: rows per chunk (worker; default: the store's)")
    ap.add_argument("--window-chunks", type=int, default=None, help="ours: chunks per shuffle window (worker)")
    ap.add_argument("--variant", type=int, default=256,
                    help="also run ours with this chunk size and the same 4,096-cell window (0 = skip); the "
                         "default 256 is the chunking of stores that do not record preshuffled")
    ap.add_argument("--small", type=int, default=50_000, help="cells of the comparison store")
    ap.add_argument("--large", type=int, default=1_000_000, help="cells of the memory-check store (0 = skip)")
    ap.add_argument("--large-cells", type=int, default=300_000, help="cells streamed from the large store")
    ap.add_argument("--repeat", type=int, default=3, help="runs per loader and batch size (best is shown)")
    ap.add_argument("--codecs", default="lz4",
                    help="comma-separated count-array codecs: ours streams one store per codec (lz4 | zstd | none)")
    ap.add_argument("--batches", default="128,1024", help="batch sizes of the comparison ('' = memory check only)")
    ap.add_argument("--large-codecs", default="lz4", help="codecs of the 1M memory check (comma-separated)")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "loader.json"))
    args = ap.parse_args()
    if args.worker:
        if args.worker == "ours":
            worker_ours(args.store, args.batch, args.max_cells, args.chunk_size, args.window_chunks)
            return
        {"scvi": worker_scvi, "annbatch": worker_annbatch}[args.worker](args.store, args.batch, args.max_cells)
        return

    small = ensure_store(args.small)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    smalls = {c: codec_store(args.small, c) for c in codecs}
    disk = {p.name: round(_du_mib(p), 1) for p in smalls.values()}
    rows = []
    load = {"start": os.getloadavg()}
    for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
        loaders = [(sys.executable, "ours", (), smalls[c]) for c in codecs] + [(sys.executable, "scvi", (), small)]
        if args.variant:  # coarser chunks, same window of cells: fewer, larger reads
            loaders.append((sys.executable, "ours", ("--chunk-size", str(args.variant), "--window-chunks",
                                                     str(max(1, 16 * 256 // args.variant))), small))
        if ANNBATCH_PY.exists():
            loaders.append((ANNBATCH_PY, "annbatch", (), small))
        else:
            rows.append({"loader": "annbatch", "batch": batch, "store": small.name,
                         "error": f"skipped: {ANNBATCH_PY} not found (annbatch needs Python >= 3.12)"})
        # Repetitions interleaved across loaders (the VM is shared, so load drifts); the best run of each
        # loader is reported, all runs are kept in the JSON.
        runs = {(name, extra, st): [] for _, name, extra, st in loaders}
        for _ in range(args.repeat):
            for py, name, extra, st in loaders:
                runs[name, extra, st].append(_measure(py, name, st, batch, 10**9, extra))  # one full pass each
        for rs in runs.values():
            ok = [r for r in rs if "error" not in r]
            best = max(ok, key=lambda r: r["cells_per_s"]) if ok else rs[-1]
            rows.append({**best, "all_cells_per_s": [round(r.get("cells_per_s", 0)) for r in rs],
                         "all_cells_per_cpu_s": [round(r.get("cells_per_cpu_s", 0)) for r in rs]})
    if args.large:
        for c in [c.strip() for c in args.large_codecs.split(",") if c.strip()]:
            large = codec_store(args.large, c)
            disk[large.name] = round(_du_mib(large), 1)
            rows.append(_measure(sys.executable, "ours", large, 1024, args.large_cells))
            # The same streamed amount from the small store, for the like-for-like RSS comparison.
            rows.append(_measure(sys.executable, "ours", codec_store(args.small, c), 1024, args.large_cells))

    load["end"] = os.getloadavg()
    print(f"load average (1/5/15 min) at start {load['start']}, at end {load['end']}")
    print("disk MiB: " + ", ".join(f"{k} {v:,.1f}" for k, v in disk.items()))
    print(f"| {'loader':<16} | {'store':<24} | {'batch':>5} | {'cells':>9} | {'cells/s':>9} | {'cells/CPU-s':>11} "
          f"| {'peak RSS MiB':>12} |")
    print("|------------------|--------------------------|-------|-----------|-----------|-------------|--------------|")
    for r in rows:
        if "error" in r:
            print(f"| {r['loader']:<16} | {r['store']:<24} | {r['batch']:>5} | {r['error'][:70]}")
            continue
        print(f"| {r['loader']:<16} | {r['store']:<24} | {r['batch']:>5} | {r['cells']:>9,} | "
              f"{r['cells_per_s']:>9,.0f} | {r['cells_per_cpu_s']:>11,.0f} | {r['peak_rss_mib']:>12,.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "load_average": load, "disk_mib": disk, "python": sys.version.split()[0],
                                          "cpu_count": os.cpu_count()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
