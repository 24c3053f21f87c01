"""The output layout of a chunked mva-infer job: its three paths, and the skeleton rank 0 writes before any
chunk is computed (obs copied from the store one shard at a time, var, uns, the job's empty arrays).

``trainer/jobs/runner.py`` runs the job; this module only says what its AnnData Zarr looks like on disk.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import pandas as pd
import zarr

from trainer.jobs.common import consolidate

if TYPE_CHECKING:
    from trainer.jobs.runner import ChunkJob


def output_paths(output: str) -> tuple[Path, Path, Path]:
    """(final, partial, progress) paths of one output."""
    final = Path(output)
    return final, final.with_name(final.name + ".partial"), final.with_name(final.name + ".progress")


def write_skeleton(job: ChunkJob, path: Path) -> None:
    """obs (small: cells x columns) + var + uns through anndata, then the job's empty arrays."""
    ctx = job.ctx
    var_names = job.var_names()
    var = None if var_names is None else pd.DataFrame(index=pd.Index(var_names, dtype=str))
    uns = {"model": str(ctx.model_dir), "store": str(ctx.store.path), "job": job.name,
           "give_mean": ctx.cfg.give_mean, "n_samples": ctx.cfg.n_samples, **job.uns()}
    if not ctx.cfg.give_mean:  # posterior draws: seeded per chunk of batch_size rows, so both make them reproducible
        uns["seed"], uns["batch_size"] = ctx.cfg.seed, ctx.cfg.batch_size
    # obs of the first shard only: the other shards' rows are appended array by array below, so the
    # skeleton never holds the whole table (~100 B per cell as pandas: 1 GB at 10M cells)
    adata = ad.AnnData(obs=ctx.store.read_shard_obs(0), var=var, uns={"multivi": uns})
    with ad.settings.override(zarr_write_format=3), warnings.catch_warnings():
        # v3 = the store's format (anndata deprecates v2); its autosharding notice is about obs here
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        adata.write_zarr(str(path))
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    _append_shard_obs(ctx.store, root["obs"])
    job.create_arrays(root)
    consolidate(path)  # anndata opens through the consolidated metadata


def _row_arrays(group: zarr.Group, prefix: str = "") -> list[str]:
    """Paths of the per-row arrays of an anndata dataframe group (categories are not per row)."""
    out = []
    for name, member in group.members():
        if isinstance(member, zarr.Group):
            out += [p for p in _row_arrays(member, f"{prefix}{name}/") if not p.endswith("/categories")]
        else:
            out.append(f"{prefix}{name}")
    return out


def _append_shard_obs(store, obs: zarr.Group) -> None:
    """Grow the skeleton's obs (written from shard 0) to every cell, copying one shard's rows at a time.

    The store's shard obs groups were written by anndata from frames with the same columns and
    store-wide categories, so each output array has a same-named source array in every shard.
    """
    meta = store.meta
    if meta.n_shards == 1:
        return
    paths = _row_arrays(obs)
    for p in paths:
        a = obs[p]
        a.resize((meta.n_cells, *a.shape[1:]))
    for shard in range(1, meta.n_shards):
        src = store.root[f"shards/{shard:05d}/obs"]
        lo = meta.shard_offsets[shard]
        for p in paths:
            rows = src[p][...]
            obs[p][lo:lo + len(rows)] = rows


def is_job_output(path: Path) -> bool:
    """A finished output of a chunked job: a Zarr group whose attributes name the job (finalize)."""
    try:
        return bool(zarr.open_group(str(path), mode="r").attrs.get("mva_job"))
    except (zarr.errors.BaseZarrError, OSError, ValueError):  # not a Zarr group: a file, a run dir, damage
        return False
