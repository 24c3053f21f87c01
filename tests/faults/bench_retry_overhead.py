"""Benchmark (not a test): slice reads through data.retry.read_slice vs the raw zarr getitem, interleaved.

    OMP_NUM_THREADS=1 .venv/bin/python tests/faults/bench_retry_overhead.py [store]   (default outputs/demo/store)
"""
import asyncio
import os
import sys
import time

import numpy as np
from zarr.core.sync import sync

from data.retry import read_slice
from data.store import open_store

s = open_store(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo/store")
arrs = [a for m in ("rna", "atac") for a in s.csr_arrays(m, 0)[:2]]
rng = np.random.default_rng(0)
reqs = [(a, int(x), int(x) + 5000) for a in arrs for x in rng.integers(0, a.shape[0] - 5000, 200)]
async def raw(): return await asyncio.gather(*[a._async_array.getitem(slice(x, y)) for a, x, y in reqs])
async def wrapped(): return await asyncio.gather(*[read_slice(a, x, y) for a, x, y in reqs])
t = {"raw": [], "retry": []}
for rep in range(21):
    for name, f in (("raw", raw), ("retry", wrapped)) if rep % 2 else (("retry", wrapped), ("raw", raw)):
        t0 = time.perf_counter(); sync(f()); t[name].append(time.perf_counter() - t0)
r, w = np.median(t["raw"]), np.median(t["retry"])
print(f"{len(reqs)} slices x 21 reps interleaved: raw median {r*1e3:.1f} ms, read_slice median {w*1e3:.1f} ms, ratio {w/r:.3f}; load {os.getloadavg()}")
