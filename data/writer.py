"""StoreWriter: append blocks of cells, get a sharded Zarr v3 atlas store (schema in docs/store.md).

Memory is bounded by one shard: blocks are buffered until ``shard_size`` cells are collected, the shard
is written with anndata's element writers (so every shard opens with ``mudata.read_zarr``) and the
buffer is dropped. Per-batch RNA library statistics and per-feature detection counts are accumulated
as blocks arrive (data/store_stats.py), so nothing is ever re-read. Shards written elsewhere (the Dask
build's tasks) are accounted for with :meth:`StoreWriter.register_shard`. The store is written under ``<out>.tmp-<random>`` and
renamed to ``<out>`` only by :meth:`StoreWriter.close`, after ``complete: true`` is set: a build that dies
halfway leaves a ``.tmp-`` directory that :func:`data.store.open_store` refuses.

This module owns the store's lifecycle (staging directory, buffering into shards, stats, the final
rename); how cells are encoded in a shard is data/store_format.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import write_elem

from data import keys, leftovers
from data.manifest import write_manifest
from data.store_format import (
    DEFAULT_CODEC,
    StoreSchema,
    check_codec,
    feature_frame,
    normalize_obs,
    write_settings,
    write_shard,
)
from data.store_stats import BlockStats, block_stats


def is_store_dir(path: Path) -> bool:
    """A directory whose root zarr.json carries the store format marker (complete or not)."""
    meta = Path(path) / "zarr.json"
    try:
        return meta.is_file() and json.loads(meta.read_text()).get("attributes", {}).get("format") == keys.STORE_FORMAT
    except (OSError, ValueError):
        return False


class StoreExistsError(FileExistsError):
    """The output path exists and overwrite was not requested."""


def _empty_csr(n_rows: int, n_cols: int) -> sp.csr_matrix:
    return sp.csr_matrix((n_rows, n_cols), dtype=np.uint8)


class StoreWriter:
    """Append cell blocks with :meth:`append`, then :meth:`close` (or use as a context manager).

    ``append(rna, atac, obs)``: ``rna`` (n, n_genes) and ``atac`` (n, n_regions) CSR integer counts (or
    None when no cell of the block has that modality), ``obs`` indexed by cell id with the batch column,
    covariates, optional label, and boolean ``mask_rna`` / ``mask_atac``. Rows of an unmeasured
    modality must be empty. Validation of user input lives in ``data.validate``; the writer only checks
    the invariants it relies on.
    """

    def __init__(self, out: str | os.PathLike, schema: StoreSchema, *, shard_size: int = 65_536,
                 overwrite: bool = False, source: dict[str, Any] | None = None, preshuffled: bool = False,
                 codec: str = DEFAULT_CODEC):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.codec = check_codec(codec)  # before anything touches the disk
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise StoreExistsError(f"output {self.out} already exists (set overwrite=true to replace it)")
        if self.out.exists() and not is_store_dir(self.out):
            # overwrite deletes the whole tree: never a path this tool did not write (a project directory
            # holding the inputs, a file)
            raise StoreExistsError(f"output {self.out} exists and is not a multivi-atlas store: overwrite=true "
                                   "only replaces a store; remove it yourself or choose another output")
        self.schema = schema
        self.shard_size = int(shard_size)
        self.overwrite = bool(overwrite)
        self.source = dict(source or {})
        # the writer's caller vouches that cells arrive in random order (mva-synth, mva-build preshuffle):
        # recorded so the loader may read coarser chunks without losing shuffle quality (docs/store.md)
        self.preshuffled = bool(preshuffled)
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{secrets.token_hex(4)}")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        leftovers.clean(self.out)  # what a killed build of this output left (removed only if provably stale)
        self.root = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        leftovers.claim(self.tmp)
        # codec is written first: shards staged by Dask tasks read it from here (store_codec)
        self.root.attrs.update({"format": keys.STORE_FORMAT, "schema_version": keys.SCHEMA_VERSION,
                                "complete": False, "codec": self.codec})
        self.rna_var = feature_frame(list(schema.gene_names), schema.rna_var, parse=False)
        self.atac_var = feature_frame(list(schema.region_names), schema.atac_var, parse=True)
        self.n_genes, self.n_regions = len(self.rna_var), len(self.atac_var)
        with write_settings():
            write_elem(self.root, "features/rna", self.rna_var)
            write_elem(self.root, "features/atac", self.atac_var)
        self._buf: list[tuple[sp.csr_matrix, sp.csr_matrix, pd.DataFrame]] = []
        self._buf_rows = 0
        self.shard_offsets = [0]
        self.n_cells = 0
        self.stats = BlockStats.zeros(self.n_genes, self.n_regions, len(schema.batch_categories))
        self._next_index = 0
        self._closed = False

    # ----------------------------------------------------------------------------------- appending
    def append(self, rna: sp.spmatrix | None, atac: sp.spmatrix | None, obs: pd.DataFrame) -> None:
        n = len(obs)
        if n == 0:
            return
        rna = _empty_csr(n, self.n_genes) if rna is None else sp.csr_matrix(rna)
        atac = _empty_csr(n, self.n_regions) if atac is None else sp.csr_matrix(atac)
        if rna.shape != (n, self.n_genes) or atac.shape != (n, self.n_regions):
            raise ValueError(f"block shapes rna {rna.shape}, atac {atac.shape} do not match "
                             f"{n} cells x ({self.n_genes} genes, {self.n_regions} regions)")
        obs = normalize_obs(self.schema, obs, self._next_index)  # global row = order of arrival
        self._next_index += n
        self.stats.add(block_stats(rna, atac, obs, self.schema.batch_key, len(self.schema.batch_categories)))
        # Cut the block where it crosses shard boundaries so every shard has exactly shard_size cells.
        start = 0
        while start < n:
            take = min(n - start, self.shard_size - self._buf_rows)
            sl = slice(start, start + take)
            self._buf.append((rna[sl], atac[sl], obs.iloc[sl]))
            self._buf_rows += take
            start += take
            if self._buf_rows == self.shard_size:
                self._flush()

    @property
    def n_appended(self) -> int:
        """Cells appended or registered so far (written or still buffered)."""
        return self._next_index

    # ----------------------------------------------------------------------------------- shards
    def register_shard(self, n_cells: int, stats: BlockStats) -> None:
        """Account for the next shard, ``shards/<n_shards:05d>`` of ``n_cells`` cells, written into
        ``self.tmp`` by someone else (data/dask_build.py) with ``stats`` of its cells. Call in shard order."""
        if self._buf_rows:
            raise RuntimeError("register_shard after append: cells are buffered for a shard of their own")
        self.stats.add(stats)
        self.n_cells += int(n_cells)
        self.shard_offsets.append(self.n_cells)
        self._next_index = self.n_cells

    def _flush(self) -> None:
        if not self._buf_rows:
            return
        rna = sp.vstack([b[0] for b in self._buf], format="csr")
        atac = sp.vstack([b[1] for b in self._buf], format="csr")
        obs = pd.concat([b[2] for b in self._buf])
        self._buf, self._buf_rows = [], 0
        write_shard(self.root, len(self.shard_offsets) - 1, rna, atac, obs, self.rna_var, self.atac_var,
                    codec=self.codec)
        self.n_cells += len(obs)
        self.shard_offsets.append(self.n_cells)

    # ----------------------------------------------------------------------------------- finishing
    def close(self) -> Path:
        """Write the last shard, the stats and ``complete: true``, then rename into place."""
        if self._closed:
            return self.out
        self._flush()
        if self.n_cells == 0:
            self.abort()
            raise ValueError(f"no cells were written to {self.out} (empty input)")
        s = self.schema
        with write_settings():
            for name, arr in self.stats.arrays().items():
                write_elem(self.root, f"stats/{name}", arr)
        self.root.attrs.update({
            "n_cells": self.n_cells, "n_genes": self.n_genes, "n_regions": self.n_regions,
            "n_shards": len(self.shard_offsets) - 1, "shard_offsets": [int(o) for o in self.shard_offsets],
            "batch_key": s.batch_key, "batch_categories": list(map(str, s.batch_categories)),
            "cat_cov_keys": list(s.cat_cov_keys),
            "cat_cov_categories": {k: list(map(str, v)) for k, v in s.cat_cov_categories.items()},
            "cont_cov_keys": list(s.cont_cov_keys), "label_key": s.label_key,
            "label_categories": list(map(str, s.label_categories)),
            "n_cells_rna": self.stats.n_measured[keys.RNA], "n_cells_atac": self.stats.n_measured[keys.ATAC],
            "source": self.source, "created_by": f"multivi-atlas {_version()}", "preshuffled": self.preshuffled,
            "codec": self.codec,
        })
        leftovers.release(self.tmp)
        write_manifest(self.tmp)  # every file but the root zarr.json, whose attributes change next
        self.root.attrs["complete"] = True  # last write before the rename: only a finished store has it
        if self.out.exists() and not self.overwrite:
            # appeared while we wrote (another build to the same output): not ours to replace
            raise StoreExistsError(f"output {self.out} appeared while this store was written (another build to the "
                                   "same output?); set overwrite=true to replace it")
        if self.out.exists():
            # the old store is moved aside, not deleted, until the new one is in place: a kill between
            # the two renames leaves it recoverable (<out>.old-<id>) instead of gone
            old = self.out.with_name(f"{self.out.name}.old-{secrets.token_hex(4)}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        self._closed = True
        return self.out

    def abort(self) -> None:
        """Remove the temporary directory (called on errors; a SIGKILL leaves a refused .tmp- dir)."""
        self._closed = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:  # a failed rename must not leave a complete-looking .tmp- directory behind
            self.abort()
            raise


def _version() -> str:
    try:
        return importlib.metadata.version("multivi-atlas")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
