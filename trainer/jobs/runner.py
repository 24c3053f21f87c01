"""The restartable, rank-sharded, in-order chunk machinery every cells-by-something job shares.

A job (``ChunkJob`` subclass) says what its output holds and how one chunk of cells is computed; the
runner (``run_chunked``) does everything else, identically for embed, expression and accessibility:

* output ``<output>.partial`` (an AnnData Zarr: obs copied from the store, var = the job's feature
  names, uns['multivi'] = the settings) whose skeleton rank 0 writes before anyone computes
  (``trainer/jobs/skeleton.py``);
* done markers and a settings fingerprint in ``<output>.progress`` (``common.Progress``): a rerun after
  a crash skips finished chunks (with any world size: chunks are global row ranges) and refuses an
  unfinished output that was started with other settings;
* rank ``r`` computes its contiguous block of chunk ids (``common.my_chunks``), so ranks write disjoint
  rows and the output is in store order whatever the world size;
* finalize on rank 0 once every chunk is done: the job's ``finish`` hook (e.g. assembling a sparse X),
  consolidated metadata, ``mva_complete``, rename to ``<output>``. ``<output>`` existing therefore
  always means complete;
* rank 0 holds an exclusive lock (``trainer.lock``) on ``<output>.progress`` for the whole job, so two
  jobs never write the same output; a lock left by a killed job is cleared (its holder is provably
  dead), because rerunning after a crash is the normal way to finish an output;
* pipelining: the job computes chunk k+1 (its store reads issued ahead) while a writer thread stores
  chunk k; the chunk's done marker is written only after its rows are stored.

* I/O: output arrays are opened on ``direct_io.DirectLocalStore`` (chunks >= 1 MiB go to disk with
  O_DIRECT, not through the page cache) and large freed blocks stay in the heap (``trainer.alloc``).

Memory per rank is one batch of cells plus two chunks' results (computing + storing), never
cells x features.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from data import keys
from data.collate import to_device
from data.store import Store
from trainer import dist
from trainer.alloc import reuse_large_allocations
from trainer.export import WEIGHTS, load_model
from trainer.infer_config import InferConfig
from trainer.jobs.common import (
    InferError,
    Progress,
    chunk_ranges,
    consolidate,
    create_dense,
    feature_chunk_cols,
    inference_stream,
    my_chunks,
    open_checked_store,
    output_compressors,
    resolve_model_dir,
    store_identity,
)
from trainer.jobs.direct_io import DirectLocalStore
from trainer.jobs.skeleton import is_job_output, output_paths, write_skeleton

__all__ = ["FAIL_AFTER_ENV", "ChunkJob", "JobContext", "consolidate", "create_dense", "feature_chunk_cols",
           "open_job", "output_compressors", "run_chunked"]
from trainer.lock import LOCK_NAME, LockError
from trainer.lock import acquire as acquire_lock
from trainer.module import MultiVAE

# Write big output chunks with O_DIRECT (trainer/jobs/direct_io.py: no page-cache copy charged to the job);
# False = zarr's ordinary LocalStore writes (A/B timing). The bytes on disk are the same.
DIRECT_WRITES = True
# Keep large freed blocks in the heap (trainer/alloc.py): every chunk's (cells x features) decoder output,
# sigmoid and zarr buffers are otherwise fresh mmaps that the kernel zero-fills page by page (measured:
# ATAC head 10 -> 100 -> 100 -> 10,000 + sigmoid 53 -> 23 us per cell; whole accessibility job ~175 ->
# ~140 us of CPU per cell).
REUSE_ALLOCATIONS = True
# Test hook: raise after this many chunks were written by this process (simulates a crash mid-job).
FAIL_AFTER_ENV = "MVA_INFER_FAIL_AFTER_CHUNKS"
# Store chunk k on a writer thread while chunk k+1 is read and computed (one chunk in flight, so memory is
# two chunks' results); False = store synchronously (debugging, A/B timing).
OVERLAP_WRITES = True
# Top-level config keys that do not change the output (and so are not part of the fingerprint); device: a crashed
# GPU job may be finished on a CPU (as with device=auto on either, the rows differ by float rounding only)
_NOT_SETTINGS = ("output", "overwrite", "progress", "timeout_s", "device", "model_dir", "store", "embed",
                 "expression", "accessibility", "de", "export")


@dataclass
class JobContext:
    cfg: InferConfig
    info: dist.DistInfo
    model_dir: Path
    module: MultiVAE
    model_info: dict
    store: Store

    @property
    def n_cells(self) -> int:
        return self.store.meta.n_cells


def open_job(cfg: InferConfig) -> JobContext:
    """Join the process group (if any), load the model and open the store checked against it."""
    info = dist.init_distributed(cfg.timeout_s, device=cfg.device)
    model_dir = resolve_model_dir(cfg.model_dir)
    module, minfo = load_model(model_dir, device=info.device)
    store = open_checked_store(cfg.store, minfo)
    return JobContext(cfg, info, model_dir, module, minfo, store)


class ChunkJob:
    """One job's part; subclasses set ``name`` / ``section`` and override the hooks they need.

    ``__init__`` of a subclass validates the job's options (every rank raises the same InferError
    before anything is written), so bad input never leaves a half-made output behind.
    """

    name = ""
    section: str | None = None  # attribute of InferConfig holding this job's options

    def __init__(self, ctx: JobContext):
        self.ctx = ctx

    def settings(self) -> dict:
        """Extra fingerprint entries (the job's section is included automatically)."""
        return {}

    def uns(self) -> dict:
        """Small JSON-like settings written to uns['multivi'] (no None values: anndata can't write them)."""
        return {}

    def var_names(self) -> list[str] | None:
        return None

    def create_arrays(self, root: zarr.Group) -> None:
        """Rank 0: the empty output arrays in the skeleton."""

    def open_arrays(self, root: zarr.Group, work_dir: Path) -> None:
        """Every rank: get handles on the arrays (``work_dir`` = the progress directory, for side files)."""

    def compute_chunk(self, k: int, lo: int, hi: int, batch: dict) -> Callable[[], None]:
        """Compute rows [lo, hi) from ``batch``; return the action that stores them (the runner runs it on
        its writer thread while the next chunk is computed, then records the chunk as done)."""
        raise NotImplementedError

    def finish(self, root: zarr.Group, work_dir: Path) -> None:
        """Rank 0, after every chunk is done and before consolidation (idempotent: may be rerun)."""

    def after_output(self, final: Path) -> None:
        """Rank 0, once ``final`` is complete, before the progress directory goes (e.g. a picture of it): a
        job killed here is finished by rerunning the same command, which runs this again."""


def _fingerprint(job: ChunkJob) -> dict:
    ctx = job.ctx
    c = {k: v for k, v in asdict(ctx.cfg).items() if k not in _NOT_SETTINGS}
    if job.section is not None:
        c[job.section] = asdict(getattr(ctx.cfg, job.section))
    w = ctx.model_dir / WEIGHTS
    return {**c, **job.settings(), "model_dir": str(ctx.model_dir.resolve()),
            "model_mtime_ns": w.stat().st_mtime_ns, **store_identity(ctx.store), "n_cells": ctx.n_cells}


# a killed write's temporary file (trainer/jobs/direct_io.py and zarr's LocalStore: "<key>.<uuid hex>.partial"
# next to the chunk); the rerun writes the chunk anew, under another name
_STRAY_TEMP = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_stray_temps(root: Path) -> int:
    """Delete the temporary files killed writes left under ``root``; returns how many. Finished outputs held
    such files (a full chunk each, up to 8 MiB) for about 1 kill in 5 of a dense accessibility job."""
    n = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if _STRAY_TEMP.search(name):
                Path(folder, name).unlink(missing_ok=True)
                n += 1
    return n


def finish_leftover(prog_dir: Path, fingerprint: dict, info: dist.DistInfo, final: Path, what: str,
                    complete: Callable[[], bool], after: Callable[[], None] | None = None) -> bool:
    """Whether ``final`` (``complete()``: a finished output of this job) was written by a job with these settings
    that was killed before emptying ``prog_dir``; if so, finish it (``after`` on rank 0, then the cleanup) under
    the lock. Such a rerun of the same command said "already exists" for ever, and the stale lock and the
    progress (thousands of markers) stayed. Decided on rank 0; every rank gets its answer."""
    mine = info.is_main and Progress(prog_dir).same_settings(fingerprint) and complete()
    if not dist.broadcast_object(bool(mine)):
        return False
    with holding_lock(prog_dir, info):
        if info.is_main:
            if after is not None:
                after()
            _empty_dir(prog_dir)
            dist.print0(f"[infer] {what}: {final} was already complete; removed what the killed job that wrote it "
                        f"left in {prog_dir}")
    return True


def _empty_dir(d: Path) -> None:
    """Remove everything in ``d`` except our lock file (the lock guards the whole job)."""
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextmanager
def holding_lock(prog_dir: Path, info: dist.DistInfo):
    """Rank 0 locks ``prog_dir`` for the body (every rank raises the same error if that fails); after a
    finished body the lock is released and the then empty directory removed. Unless another job took the
    lock meanwhile: then the directory is left to it; after a failure the directory keeps the progress."""
    lock, error = None, ""
    if info.is_main:
        try:
            lock = acquire_lock(prog_dir, "mva-infer", clear_stale=True)
        except LockError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error:
        raise InferError(error)
    finished = False
    try:
        yield
        finished = True
    finally:
        if lock is not None:
            lock.release()
            if finished:
                with suppress(OSError):
                    prog_dir.rmdir()


def _on_main(info: dist.DistInfo, fn) -> None:
    """Run ``fn`` on rank 0 while the others wait; if it fails, every rank raises (none waits forever)."""
    error, failure = "", None
    if info.is_main:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on rank 0 unchanged
            error, failure = (str(exc) if isinstance(exc, InferError) else f"{type(exc).__name__}: {exc}"), exc
    error = dist.broadcast_object(error)  # a collective: also the barrier after rank 0's work
    if failure is not None:
        raise failure
    if error:
        raise InferError(f"rank 0 failed: {error}")


def run_chunked(job: ChunkJob) -> dict:
    """Run ``job`` over every cell of the store; returns a small summary (this rank's view)."""
    cfg, info = job.ctx.cfg, job.ctx.info
    final, partial, prog_dir = output_paths(cfg.output)
    if final.exists() and not cfg.overwrite:
        if finish_leftover(prog_dir, _fingerprint(job), info, final, job.name, lambda: is_job_output(final),
                           lambda: job.after_output(final)):
            return {"output": str(final), "n_cells": job.ctx.n_cells, "chunks_written": 0, "rank": info.rank,
                    "world_size": info.world_size}
        raise InferError(f"{final} already exists: pass overwrite=true to replace it")
    if final.exists() and not is_job_output(final):
        # overwrite deletes the whole tree: never on a path this tool did not write (a mistyped output=
        # naming a run directory or a store)
        raise InferError(f"{final} exists and is not an mva-infer output (no finished job's Zarr group): "
                         "overwrite=true only replaces those; remove it yourself or choose another output")
    dist.barrier()  # every rank has checked the output before rank 0 starts deleting things
    with holding_lock(prog_dir, info):
        return _run_locked(job, final, partial, prog_dir)


def _run_locked(job: ChunkJob, final: Path, partial: Path, prog_dir: Path) -> dict:
    ctx, cfg, info = job.ctx, job.ctx.cfg, job.ctx.info
    progress = Progress(prog_dir)

    def setup() -> None:
        if cfg.overwrite:
            shutil.rmtree(final, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
            _empty_dir(prog_dir)
        if not (prog_dir / "job.json").is_file() or not partial.is_dir():
            # no finished skeleton (job.json is written last), or no partial output to finish (a job killed
            # between renaming it to the final output and emptying this directory, output removed since):
            # start from scratch
            shutil.rmtree(partial, ignore_errors=True)
            _empty_dir(prog_dir)
            write_skeleton(job, partial)
        progress.start(_fingerprint(job))  # raises if an unfinished output has other settings

    _on_main(info, setup)

    if REUSE_ALLOCATIONS:
        reuse_large_allocations()
    out_store = DirectLocalStore(partial) if DIRECT_WRITES else str(partial)
    job.open_arrays(zarr.open_group(out_store, mode="r+", use_consolidated=False), prog_dir)
    stream = inference_stream(ctx.store, ctx.module, ctx.model_info, batch_size=cfg.batch_size, split="all",
                              shuffle=False, rank=info.rank, world_size=info.world_size, prefetch=0)
    chunks = chunk_ranges(ctx.n_cells, cfg.batch_size)
    block = my_chunks(len(chunks), info.rank, info.world_size)
    mine = [k for k in block if not progress.is_done(k)]
    if info.is_main:  # a rerun said nothing of the chunks it kept
        done = sum(progress.is_done(k) for k in range(len(chunks)))
        if done:
            dist.print0(f"[infer] {job.name}: resuming the unfinished {final}: {done} of {len(chunks)} chunks "
                        "already done")
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"[infer] {job.name} (rank 0)", unit="chunk")
    reader = stream._get_reader()  # the loader's chunk reader: read_ahead() overlaps the next chunk's reads
    written = 0

    def store(action: Callable[[], None], k: int) -> None:
        action()
        progress.mark_done(k)  # only after the rows are stored: a crash redoes this chunk

    def completed(fut: Future) -> None:
        nonlocal written
        fut.result()  # re-raises a failed store here, in the main thread
        written += 1
        if bar is not None:
            bar.update(1)
        if fail_after and written >= fail_after:
            raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: simulated crash after {written} chunks")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mva-infer-store") as pool:
        pending: Future | None = None
        for i, k in enumerate(mine):
            lo, hi = chunks[k]
            host = stream.make_batch(np.arange(lo, hi, dtype=np.int64))
            # checked on the host batch: reading it back from the GPU cost a copy and a sync per chunk
            if not np.array_equal(host[keys.INDEX].numpy(), np.arange(lo, hi)):
                raise RuntimeError(f"loader returned other cells than rows [{lo}, {hi})")  # order is the contract
            batch = to_device(host, info.device)
            if i + 1 < len(mine):
                reader.read_ahead(np.arange(*chunks[mine[i + 1]], dtype=np.int64))
            if not cfg.give_mean:
                torch.manual_seed(cfg.seed * 1_000_003 + k)  # samples independent of world size and restarts
            with torch.no_grad():
                action = job.compute_chunk(k, lo, hi, batch)
            if pending is not None:
                fut, pending = pending, None
                completed(fut)
            pending = pool.submit(store, action, k)
            if not OVERLAP_WRITES:
                fut, pending = pending, None
                completed(fut)
        if pending is not None:
            completed(pending)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    dist.barrier()

    def finalize() -> None:
        missing = [k for k in range(len(chunks)) if not progress.is_done(k)]
        if missing:
            raise InferError(f"{len(missing)} chunks were not written (first: {missing[:5]}); rerun to finish")
        remove_stray_temps(partial)  # before finish: its own writes (a sparse X) leave none of their own
        root = zarr.open_group(str(partial), mode="r+", use_consolidated=False)
        job.finish(root, prog_dir)
        root.attrs.update({"mva_complete": True, "mva_job": job.name})
        consolidate(partial)
        partial.rename(final)
        dist.print0(f"[infer] {job.name}: {ctx.n_cells} cells -> {final}")

    _on_main(info, finalize)
    if info.is_main:  # after the last collective: the other ranks are done and need not wait
        job.after_output(final)
        _empty_dir(prog_dir)
    return {"output": str(final), "n_cells": ctx.n_cells, "n_chunks": len(chunks), "chunks_written": written,
            "chunks_skipped": len(block) - len(mine), "seconds": seconds, "rank": info.rank,
            "world_size": info.world_size}
