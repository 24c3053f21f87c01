"""``scripts/bench/infer.py --profile JOB``: CPU microseconds per cell of each stage of one of our
inference jobs, and of the alternatives for each stage (see docs/benchmarks.md "Inference")."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from bench_common import BENCH, cpu_s


def profile_stages(job: str, model_dir: str, store_path: str, batch: int, n_batches: int) -> list[tuple[str, float]]:
    """CPU microseconds per cell of each stage of one job's per-batch work (process CPU time, all threads:
    steadier than wall time on a shared machine), plus what the alternatives of each stage cost.

    Set up like the job (trainer/jobs/runner.py): large freed blocks kept in the heap
    (``trainer.alloc``), output on a ``DirectLocalStore``. Stages the job does: read, encode, the one
    decoder head it needs, the ``trainer.predict`` call end to end, the Zarr write as the job writes it
    (expression: blosc lz4 through the store, O_DIRECT for chunks >= 1 MiB; accessibility: uncompressed
    chunks by ``RawChunkWriter``). Variants: encoders on measured rows only, both heads, and other writes
    (zarr's own LocalStore = page cache, other codecs and dtypes)."""
    import tempfile

    import numpy as np
    import torch
    import zarr

    from data.collate import to_device
    from data.stream import StoreStream
    from trainer.alloc import reuse_large_allocations
    from trainer.export import load_model
    from trainer.jobs.accessibility import quantize
    from trainer.jobs.common import open_checked_store
    from trainer.jobs.direct_io import DirectLocalStore, RawChunkWriter
    from trainer.jobs.runner import create_dense, feature_chunk_cols
    from trainer.predict import normalized_accessibility, normalized_expression

    torch.set_num_threads(1)
    reuse_large_allocations()  # as the runner does
    module, info = load_model(model_dir)
    store = open_checked_store(store_path, info)
    stream = StoreStream(store, batch_size=batch, split="all", shuffle=False, prefetch=0)
    n_feat = {"embed": module.n_latent, "expression": module.n_genes, "accessibility": module.n_regions}[job]
    tmp = tempfile.mkdtemp(dir=BENCH)
    direct = zarr.open_group(DirectLocalStore(f"{tmp}/d.zarr"), mode="w")
    cache = zarr.open_group(f"{tmp}/p.zarr", mode="w")  # zarr's own LocalStore: through the page cache
    cols = feature_chunk_cols(batch, n_feat)
    shape = (batch * n_batches, n_feat)

    def dense(root, name, dtype, compress):
        return create_dense(root, name, shape, dtype, batch, cols, compress=compress)

    # name -> (array, dtype written); the first entry is what the job does
    writes = {}
    if job == "accessibility":
        writes["write (job: float32, raw chunks, O_DIRECT)"] = (dense(direct, "a", "float32", False), None)
        writes["float32 lz4, O_DIRECT store"] = (dense(direct, "b", "float32", True), None)
        writes["float32 uncompressed, page cache (zarr)"] = (dense(cache, "c", "float32", False), None)
        writes["float32 lz4, page cache (the job before)"] = (dense(cache, "e", "float32", True), None)
        writes["float16 raw chunks, O_DIRECT"] = (dense(direct, "f", "float16", False), np.float16)
        writes["uint8 (job option: lz4), O_DIRECT store"] = (dense(direct, "u", "uint8", True), np.uint8)
    elif job == "expression":
        writes["write (job: float32 lz4, O_DIRECT store)"] = (dense(direct, "a", "float32", True), None)
        writes["float32 raw chunks, O_DIRECT"] = (dense(direct, "b", "float32", False), None)
        writes["float32 lz4, page cache (the job before)"] = (dense(cache, "e", "float32", True), None)
    else:
        writes["write (job: float32 lz4)"] = (dense(direct, "a", "float32", True), None)
    writers = {name: RawChunkWriter(arr) for name, (arr, _) in writes.items()}
    cost: dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        c0 = cpu_s()
        yield
        cost[name] = cost.get(name, 0.0) + cpu_s() - c0

    cells = 0
    with torch.no_grad():
        for k in range(n_batches):
            lo, hi = k * batch, min((k + 1) * batch, store.meta.n_cells)
            if hi - lo < batch:
                break  # whole chunks only (the job's last short chunk goes through zarr)
            with stage("read + collate batch"):
                b = to_device(stream.make_batch(np.arange(lo, hi)), "cpu")
            eps = torch.zeros(hi - lo, module.n_noise)
            with stage("encode (module.inference)"):
                inf = module.inference(b, eps=eps)
            with stage("  variant: encode measured rows only (inference(measured_only=True))"):
                module.inference(b, eps=eps, measured_only=True)
            z = inf["qz_m"]
            if job == "embed":
                out = z.numpy()
            else:
                with stage("  variant: both heads (module.generative)"):
                    module.generative(z, b, inf["lib_rna"])
                if job == "expression":
                    with stage("decode, RNA head only"):
                        module.decode_expression_scale(z, b)
                    with stage("predict.normalized_expression (end to end)"):
                        out = normalized_expression(module, b, library_size=1.0).numpy()
                else:
                    with stage("decode, ATAC head only"):
                        module.decode_accessibility(z, b)
                    with stage("predict.normalized_accessibility (end to end)"):
                        out = normalized_accessibility(module, b).numpy()
            for name, (_, dtype) in writes.items():
                val = out
                if dtype == np.uint8:
                    with stage("  uint8 quantisation (torch)"):
                        val = quantize(out, np.uint8)
                elif dtype is not None:
                    with stage("  float16 cast"):
                        val = out.astype(dtype)
                with stage(name if name.startswith("write (job") else "  variant: write " + name):
                    writers[name].write(lo, hi, val)
            cells += hi - lo
    shutil.rmtree(tmp, ignore_errors=True)
    return [(name, 1e6 * c / cells) for name, c in cost.items()]


# ----------------------------------------------------------------------------------- driver


def print_profile(job: str, model_dir: str, store: Path, batch: int, n_batches: int) -> None:
    rows = profile_stages(job, model_dir, str(store), batch, n_batches)
    print(f"{job}: CPU per cell by stage ({n_batches} batches of {batch}, {store.name}, "
          f"load average {os.getloadavg()[0]:.1f})")
    for name, us in rows:
        print(f"  {name:50s} {us:8.1f} us/cell  ({1e6 / max(us, 1e-3):9.0f} cells/CPU-s)")
