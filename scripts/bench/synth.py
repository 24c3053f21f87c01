"""Benchmark mva-synth at scale: wall time, peak RSS and store size (target: 1M cells < 4 GiB RSS).

Runs ``python -m data.synthetic`` in a child process per size (so peak RSS is the child's own) and
prints a table; JSON goes to outputs/bench/synth.json.
  .venv/bin/python scripts/bench/synth.py                       # 1,000,000 x 2,000 x 10,000
  .venv/bin/python scripts/bench/synth.py --cells 50000 200000  # other sizes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_one(n_cells: int, n_genes: int, n_regions: int, out_dir: Path, keep: bool) -> dict:
    out = out_dir / f"synth_{n_cells}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "data.synthetic", f"out={out}", f"n_cells={n_cells}", f"n_genes={n_genes}",
           f"n_regions={n_regions}", "overwrite=true", "progress=false"]
    t0 = time.perf_counter()
    # wait4 gives the child's own peak RSS (ru_maxrss, KiB on Linux), unaffected by earlier children.
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"mva-synth failed for {n_cells} cells")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    row = {"n_cells": n_cells, "n_genes": n_genes, "n_regions": n_regions, "wall_s": round(wall, 1),
           "cells_per_s": round(n_cells / wall), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
           "store_gib": round(size / 2**30, 3), "cpu_user_s": round(usage.ru_utime, 1)}
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--regions", type=int, default=10_000)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench"))
    ap.add_argument("--keep", action="store_true", help="keep the stores (e.g. for the loader benchmark)")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [run_one(n, args.genes, args.regions, out_dir, args.keep) for n in args.cells]
    hdr = f"| {'cells':>9} | {'genes':>5} | {'peaks':>6} | {'wall s':>7} | {'cells/s':>7} | {'peak RSS GiB':>12} | {'store GiB':>9} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['n_cells']:>9,} | {r['n_genes']:>5} | {r['n_regions']:>6} | {r['wall_s']:>7} | "
              f"{r['cells_per_s']:>7} | {r['peak_rss_gib']:>12} | {r['store_gib']:>9} |")
    (out_dir / "synth.json").write_text(json.dumps({"rows": rows, "python": sys.version.split()[0],
                                                     "cpu_count": os.cpu_count()}, indent=2))
    print(f"wrote {out_dir / 'synth.json'}")


if __name__ == "__main__":
    main()
