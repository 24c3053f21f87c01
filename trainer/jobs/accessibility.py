"""accessibility: the accessibility probability of every cell and region (or a region subset).

Output ``<output>``: an AnnData Zarr with X = cells x regions (all regions in model order, or the
``accessibility.regions`` subset in the given order), obs copied from the store, var = the region
names, uns['multivi'] = the settings.

Semantics (reference: ``MULTIVI.get_normalized_accessibility``, spec 5.3; math in ``trainer.predict``):

* value = p, the ATAC decoder's probability; ``normalize_cells`` multiplies by the cell's ATAC
  library factor, ``normalize_regions`` by sigmoid(region factor) (needs a model with region factors);
* ``transform_batch``: as in expression (labels or codes; a list is averaged, where the reference used
  only its first element); ``give_mean`` / ``n_samples``: as in expression (mean of z, or the average
  over posterior draws);
* ``compress``: blosc lz4 on the dense X; null = only for uint8. Uncompressed float chunks are written
  by ``direct_io.RawChunkWriter`` (O_DIRECT, one copy; lz4 would cost ~35 us of CPU per cell for ~18 %
  smaller files);
* ``dtype``: float32 | float16 | uint8. uint8 stores round(255 p): read back as X * scale, with
  ``scale = 1/255`` in uns['multivi']['scale'] and in X's attrs ``mva_scale``;
* ``threshold`` t in (0, 1]: keep only p >= t, written as a sparse CSR X (anndata's csr_matrix
  encoding; float32 or uint8 values: scipy.sparse has no float16). The number of kept values is unknown until the end, so each chunk's CSR pieces (values,
  column indices, per-row counts) go to plain ``.npy`` files in ``<output>.progress``; rank 0 then
  streams them into X/data, X/indices, X/indptr in order, one Zarr chunk at a time. ``threshold=0``
  keeps everything and behaves like null (dense X), as in the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import zarr

from trainer.infer_config import InferConfig
from trainer.jobs import runner
from trainer.jobs.common import (
    InferError,
    average_of_draws,
    batch_codes,
    check_dtype,
    chunk_ranges,
    select_features,
)
from trainer.jobs.direct_io import RawChunkWriter
from trainer.jobs.runner import (
    ChunkJob,
    JobContext,
    create_dense,
    feature_chunk_cols,
    open_job,
    output_compressors,
    run_chunked,
)
from trainer.predict import normalized_accessibility

DTYPES = ("float32", "float16", "uint8")
UINT8_SCALE = 1.0 / 255.0
SPARSE_CHUNK = 1 << 20  # elements per Zarr chunk of X/data and X/indices
_PIECES = ("data", "indices", "rownnz")


def quantize(p: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:
        # torch's fused in-place ops: ~6x cheaper per cell than numpy's clip/rint/astype temporaries;
        # round-half-to-even like np.rint
        return torch.from_numpy(p).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8).numpy()
    return p.astype(dtype, copy=False)


def _piece(work_dir: Path, k: int, what: str) -> Path:
    return work_dir / f"sparse-{k:07d}-{what}.npy"


class AccessibilityJob(ChunkJob):
    name = "accessibility"
    section = "accessibility"

    def __init__(self, ctx: JobContext):
        super().__init__(ctx)
        opts, meta = ctx.cfg.accessibility, ctx.store.meta
        self.opts = opts
        self.dtype = np.dtype(check_dtype(opts.dtype, DTYPES, "accessibility"))
        self.index, self.names = select_features(opts.regions, meta.region_names, "region")
        # the model's batch list, not the store's: a store of some of the model's batches numbers them from 0,
        # and its batches reach the module recoded to the model's codes (common.inference_stream)
        self.batches = [str(b) for b in ctx.model_info["batch_categories"]]
        self.codes = batch_codes(opts.transform_batch, self.batches, ctx.module.n_batch)
        t = opts.threshold
        if t is not None and (isinstance(t, bool) or not 0.0 <= float(t) <= 1.0):
            raise InferError(f"accessibility.threshold must be between 0 and 1, got {t!r}")
        self.threshold = float(t) if t else None  # 0 keeps everything: dense, like the reference
        if self.threshold is not None and self.dtype == np.float16:
            raise InferError("accessibility.threshold (a sparse X) needs dtype float32 or uint8: scipy.sparse, "
                             "which anndata reads it into, has no float16")
        if opts.normalize_regions and ctx.module.region_factors is None:
            raise InferError("accessibility.normalize_regions=true needs a model trained with region factors")
        # indices are column numbers < n_regions: int32 unless a store has more than 2^31 regions
        self.index_dtype = np.dtype(np.int32 if len(self.names) < 2**31 else np.int64)
        # float probabilities barely compress (lz4: ~18 % smaller for ~35 us of CPU per cell); uint8 does
        self.compress = self.dtype == np.uint8 if opts.compress is None else bool(opts.compress)
        self.X: zarr.Array | None = None
        self.writer: RawChunkWriter | None = None
        self.work_dir: Path | None = None

    def var_names(self) -> list[str]:
        return self.names

    def uns(self) -> dict:
        o = self.opts
        out = {"normalize_cells": o.normalize_cells, "normalize_regions": o.normalize_regions,
               "dtype": self.dtype.name, "sparse": self.threshold is not None}
        if self.threshold is None:
            out["compressed"] = self.compress
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.dtype == np.uint8:
            out["scale"] = UINT8_SCALE
        if self.codes is not None:
            out["transform_batch"] = [self.batches[c] for c in self.codes]
        return out

    def create_arrays(self, root: zarr.Group) -> None:
        if self.threshold is not None:
            return  # sparse X is assembled in finish(), once the number of kept values is known
        rows, n = self.ctx.cfg.batch_size, len(self.names)
        arr = create_dense(root, "X", (self.ctx.n_cells, n), self.dtype, rows=rows, cols=feature_chunk_cols(rows, n),
                           fill_value=0 if self.dtype == np.uint8 else np.nan, compress=self.compress)
        if self.dtype == np.uint8:
            arr.attrs["mva_scale"] = UINT8_SCALE

    def open_arrays(self, root: zarr.Group, work_dir: Path) -> None:
        self.work_dir = work_dir
        if self.threshold is None:
            self.X = root["X"]
            self.writer = RawChunkWriter(self.X, direct=runner.DIRECT_WRITES)

    def compute_chunk(self, k: int, lo: int, hi: int, batch: dict):
        o, cfg = self.opts, self.ctx.cfg
        module = self.ctx.module

        def decode(n: int):
            return normalized_accessibility(module, batch, transform_batch=self.codes,
                                            normalize_cells=o.normalize_cells, normalize_regions=o.normalize_regions,
                                            n_samples=n, use_z_mean=cfg.give_mean, region_index=self.index)

        p = average_of_draws(decode, cfg.n_samples, hi - lo, module.n_genes + module.n_regions).cpu().numpy()
        if self.threshold is None:
            values = quantize(p, self.dtype)

            def store_dense() -> None:
                self.writer.write(lo, hi, values)

            return store_dense
        keep = p >= self.threshold
        # flat positions in row-major order = CSR order; one 1-D flatnonzero is ~3x faster than a 2-D
        # nonzero + (rows, cols) fancy indexing (measured on 1024 x 10,000)
        flat = np.flatnonzero(keep)
        pieces = {"data": quantize(p.ravel()[flat], self.dtype),
                  "indices": (flat % p.shape[1]).astype(self.index_dtype),
                  "rownnz": keep.sum(1, dtype=np.int64)}

        def store_pieces() -> None:
            for what, arr in pieces.items():
                # write then rename: a crash mid-write never leaves a truncated piece under the final name
                # (the chunk's done marker comes after all three anyway)
                final = _piece(self.work_dir, k, what)
                tmp = final.with_name(final.stem + f".{os.getpid()}.tmp.npy")
                np.save(tmp, arr, allow_pickle=False)
                os.replace(tmp, final)

        return store_pieces

    def finish(self, root: zarr.Group, work_dir: Path) -> None:
        if self.threshold is None:
            return
        n_cells, n = self.ctx.n_cells, len(self.names)
        chunks = chunk_ranges(n_cells, self.ctx.cfg.batch_size)
        nnz = sum(np.load(_piece(work_dir, k, "data"), mmap_mode="r").shape[0] for k in range(len(chunks)))
        g = root.create_group("X", overwrite=True)  # a rerun of finish() replaces a half-written X
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, n]})
        if self.dtype == np.uint8:
            g.attrs["mva_scale"] = UINT8_SCALE
        step = max(1, min(SPARSE_CHUNK, nnz))
        data = _Appender(g.create_array("data", shape=(nnz,), dtype=self.dtype, chunks=(step,),
                                           compressors=output_compressors()))
        indices = _Appender(g.create_array("indices", shape=(nnz,), dtype=self.index_dtype, chunks=(step,),
                                              compressors=output_compressors()))
        indptr = _Appender(g.create_array("indptr", shape=(n_cells + 1,), dtype=np.int64,
                                          chunks=(max(1, min(SPARSE_CHUNK, n_cells + 1)),)))
        indptr.append(np.zeros(1, np.int64))
        offset = 0
        for k in range(len(chunks)):
            data.append(np.load(_piece(work_dir, k, "data"), allow_pickle=False))
            indices.append(np.load(_piece(work_dir, k, "indices"), allow_pickle=False))
            counts = np.load(_piece(work_dir, k, "rownnz"), allow_pickle=False)
            indptr.append(offset + np.cumsum(counts))
            offset += int(counts.sum())
        for a in (data, indices, indptr):
            a.close()
        if offset != nnz:
            raise RuntimeError(f"sparse pieces hold {offset} values but their data files {nnz}")


class _Appender:
    """Writes consecutive pieces into a 1-D Zarr array one whole chunk at a time (no partial-chunk
    read-modify-write); holds at most one chunk plus the current piece."""

    def __init__(self, arr: zarr.Array):
        self.arr, self.step = arr, arr.chunks[0]
        self.pos, self.buf = 0, []

    def append(self, values: np.ndarray) -> None:
        self.buf.append(values)
        have = sum(len(b) for b in self.buf)
        if have >= self.step:
            joined = np.concatenate(self.buf)
            cut = (len(joined) // self.step) * self.step
            self.arr[self.pos:self.pos + cut] = joined[:cut]
            self.pos += cut
            self.buf = [joined[cut:]]

    def close(self) -> None:
        rest = np.concatenate(self.buf) if self.buf else np.zeros(0, self.arr.dtype)
        if len(rest):
            self.arr[self.pos:self.pos + len(rest)] = rest
        self.pos += len(rest)
        if self.pos != self.arr.shape[0]:
            raise RuntimeError(f"wrote {self.pos} values into {self.arr.path} of length {self.arr.shape[0]}")


def run_accessibility(cfg: InferConfig) -> dict:
    return run_chunked(AccessibilityJob(open_job(cfg)))
