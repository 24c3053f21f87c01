"""embed: the joint latent and the per-modality latents of every cell, as an AnnData Zarr.

Output ``<output>`` (an AnnData that ``anndata.read_zarr`` opens): obs copied from the store in store
order, ``obsm['X_multivi']`` (joint), ``obsm['X_multivi_expression']`` / ``['X_multivi_accessibility']``
(per-modality posteriors, computed for every cell as in the reference: a cell without RNA still gets
an expression latent from its encoder; mask with the store's modality columns if needed).

Restartable and order-preserving under torchrun: the skeleton (obs + preallocated obsm arrays) is
written by rank 0 to ``<output>.partial``; every rank fills its contiguous block of fixed row chunks
(``trainer.jobs.common``) and records each in ``<output>.progress``; only when every chunk is done is
the metadata consolidated, ``mva_complete`` set and the directory renamed to ``<output>``. Memory per
rank is one batch of cells (the counts of ``batch_size`` cells), never cells x features.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import torch
import zarr

from data import keys
from data.collate import to_device
from data.stream import StoreStream
from trainer import dist
from trainer.export import load_model
from trainer.infer_config import LATENTS, InferConfig
from trainer.jobs.common import (
    InferError,
    Progress,
    chunk_ranges,
    my_chunks,
    open_checked_store,
    resolve_model_dir,
)
from trainer.predict import latent

# Test hook: raise after this many chunks were written by this process (simulates a crash mid-job).
FAIL_AFTER_ENV = "MVA_INFER_FAIL_AFTER_CHUNKS"


def obsm_key(modality: str) -> str:
    return "X_multivi" if modality == "joint" else f"X_multivi_{modality}"


def _paths(output: str) -> tuple[Path, Path, Path]:
    final = Path(output)
    return final, final.with_name(final.name + ".partial"), final.with_name(final.name + ".progress")


def _write_skeleton(path: Path, store, cfg: InferConfig, n_latent: int, model_dir: Path) -> None:
    """obs (small: cells x columns) through anndata, then empty obsm arrays chunked by output chunk."""
    obs = store.read_obs()
    adata = ad.AnnData(obs=obs, uns={"multivi": {"model": str(model_dir), "store": str(store.path),
                                                 "give_mean": cfg.give_mean, "n_samples": cfg.n_samples}})
    with ad.settings.override(zarr_write_format=3), warnings.catch_warnings():
        # v3 = the store's format (anndata deprecates v2); its autosharding notice is about obs here
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        adata.write_zarr(str(path))
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    n = store.meta.n_cells
    extra = () if (cfg.give_mean or cfg.n_samples == 1) else (cfg.n_samples,)
    for m in cfg.modalities:
        shape = (n, *extra, n_latent)
        arr = root.create_array(f"obsm/{obsm_key(m)}", shape=shape, dtype="float32",
                                chunks=(min(cfg.batch_size, max(n, 1)), *shape[1:]), fill_value=np.nan)
        arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    _consolidate(path)  # anndata opens through the consolidated metadata


def _consolidate(path: Path) -> None:
    with warnings.catch_warnings():
        # zarr warns that v3 consolidated metadata is not in the spec; anndata relies on it all the same
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(str(path))


def _fingerprint(cfg: InferConfig, model_dir: Path, store) -> dict:
    c = asdict(cfg)
    for k in ("output", "overwrite", "progress", "model_dir", "store"):
        c.pop(k)
    w = model_dir / "model.safetensors"
    return {**c, "model_dir": str(model_dir.resolve()), "model_mtime_ns": w.stat().st_mtime_ns,
            "store": str(Path(store.path).resolve()), "n_cells": store.meta.n_cells}


# predict.latent's posterior means, read from ONE encoder pass (calling it per modality encodes 3x)
_MEAN_KEYS = {"joint": "qz_m", "rna": "qzm_rna", "atac": "qzm_atac"}


@torch.no_grad()
def _latents(module, batch: dict, cfg: InferConfig) -> dict[str, torch.Tensor]:
    """modality -> (B, d) means, (B, d) one sample, or (B, S, d) samples."""
    if cfg.give_mean:
        inf = module.inference(batch, eps=torch.zeros(batch[keys.MASK].shape[0], module.n_latent,
                                                      dtype=module.dtype, device=batch[keys.MASK].device))
        return {m: inf[_MEAN_KEYS[LATENTS[m]]] for m in cfg.modalities}
    out = {}
    for m in cfg.modalities:
        z = latent(module, batch, modality=LATENTS[m], give_mean=False, n_samples=cfg.n_samples)
        out[m] = z[0] if cfg.n_samples == 1 else z.transpose(0, 1)  # (S, B, d) -> (B, S, d)
    return out


def run_embed(cfg: InferConfig) -> dict:
    info = dist.init_distributed()
    model_dir = resolve_model_dir(cfg.model_dir)
    module, minfo = load_model(model_dir, device=info.device)
    store = open_checked_store(cfg.store, minfo)
    final, partial, prog_dir = _paths(cfg.output)
    progress = Progress(prog_dir)
    n_cells = store.meta.n_cells
    fingerprint = _fingerprint(cfg, model_dir, store)

    if final.exists() and not cfg.overwrite:
        raise InferError(f"{final} already exists: pass overwrite=true to replace it")
    dist.barrier()  # every rank has checked the output before rank 0 starts deleting things
    if info.is_main:
        if cfg.overwrite:
            for p in (final, partial, prog_dir):
                shutil.rmtree(p, ignore_errors=True)
        if not (prog_dir / "job.json").is_file():
            # no finished skeleton (job.json is written last): start from scratch
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(prog_dir, ignore_errors=True)
            _write_skeleton(partial, store, cfg, module.n_latent, model_dir)
        progress.start(fingerprint)  # raises if an unfinished output has other settings
    dist.barrier()

    root = zarr.open_group(str(partial), mode="r+", use_consolidated=False)
    arrays = {m: root[f"obsm/{obsm_key(m)}"] for m in cfg.modalities}
    stream = StoreStream(store, batch_size=cfg.batch_size, split="all", shuffle=False, rank=info.rank,
                         world_size=info.world_size, prefetch=0)
    chunks = chunk_ranges(n_cells, cfg.batch_size)
    mine = [k for k in my_chunks(len(chunks), info.rank, info.world_size) if not progress.is_done(k)]
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc="[infer] embed (rank 0)", unit="chunk")
    t0, written = time.perf_counter(), 0
    for k in mine:
        lo, hi = chunks[k]
        batch = to_device(stream.make_batch(np.arange(lo, hi, dtype=np.int64)), info.device)
        if not np.array_equal(batch[keys.INDEX].cpu().numpy(), np.arange(lo, hi)):
            raise RuntimeError(f"loader returned other cells than rows [{lo}, {hi})")  # order is the contract
        if not cfg.give_mean:
            torch.manual_seed(cfg.seed * 1_000_003 + k)  # samples independent of world size and restarts
        for m, z in _latents(module, batch, cfg).items():
            arrays[m][lo:hi] = z.to("cpu", torch.float32).numpy()
        progress.mark_done(k)
        written += 1
        if bar is not None:
            bar.update(1)
        if fail_after and written >= fail_after:
            raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: simulated crash after {written} chunks")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    dist.barrier()

    if info.is_main:
        missing = [k for k in range(len(chunks)) if not progress.is_done(k)]
        if missing:
            raise InferError(f"{len(missing)} chunks were not written (first: {missing[:5]}); rerun to finish")
        root = zarr.open_group(str(partial), mode="r+", use_consolidated=False)
        root.attrs.update({"mva_complete": True, "mva_job": "embed"})
        _consolidate(partial)
        partial.rename(final)
        shutil.rmtree(prog_dir, ignore_errors=True)
        dist.print0(f"[infer] embed: {n_cells} cells -> {final}")
    dist.barrier()
    return {"output": str(final), "n_cells": n_cells, "n_chunks": len(chunks), "chunks_written": written,
            "chunks_skipped": len(my_chunks(len(chunks), info.rank, info.world_size)) - len(mine),
            "seconds": seconds, "rank": info.rank, "world_size": info.world_size}
