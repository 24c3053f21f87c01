"""Open an atlas store (docs/store.md) and read from it.

``open_store(path)`` checks the format marker, the schema version and the ``complete`` flag before
anything else, so a half-written build (``<out>.tmp-*``) or a foreign Zarr group fails with a message
that says what is wrong. The :class:`Store` exposes the metadata as a dataclass, the per-cell table
(``read_obs``), contiguous row blocks as scipy CSR (``read_rows``) and the raw per-shard zarr arrays
(``csr_arrays`` / ``indptr``) for the streaming loader, which does its own fast gathers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import read_elem

from data import keys, retry

# The Rust codec pipeline is 2-10x faster on sharded stores (stack notes §4); it is a global setting.
try:  # pragma: no cover - zarrs is a declared dependency, but a store must stay readable without it
    import zarrs  # noqa: F401

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
except ImportError:  # pragma: no cover
    pass


class StoreError(ValueError):
    """The path is not a complete, readable atlas store of a supported schema version."""


class StoreReadError(StoreError):
    """A read that still failed after every retry (truncated/corrupted chunk, lost file): data/retry.py."""


@dataclass(frozen=True)
class StoreMeta:
    n_cells: int
    n_genes: int
    n_regions: int
    gene_names: list[str]
    region_names: list[str]
    batch_key: str
    batch_categories: list[str]
    cat_cov_keys: list[str]
    cat_cov_categories: dict[str, list[str]]
    cont_cov_keys: list[str]
    label_key: str | None
    label_categories: list[str]
    shard_offsets: list[int]
    n_cells_rna: int = 0
    n_cells_atac: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    # count-array compression (data.store_format.CODECS); stores written before the attribute are all "lz4"
    codec: str = "lz4"

    @property
    def n_shards(self) -> int:
        return len(self.shard_offsets) - 1

    @property
    def n_batch(self) -> int:
        return len(self.batch_categories)

    @property
    def n_cats_per_cov(self) -> tuple[int, ...]:
        return tuple(len(self.cat_cov_categories[k]) for k in self.cat_cov_keys)

    def shard_of(self, row: int) -> int:
        """Shard holding global row ``row``."""
        return int(np.searchsorted(self.shard_offsets, row, side="right") - 1)


def open_store(path: str | os.PathLike) -> Store:
    """Open and validate a store (also its file manifest: data/manifest.py); raise :class:`StoreError` naming the
    path and the problem."""
    p = Path(path)
    if ".tmp-" in p.name:
        raise StoreError(f"{p} is a temporary (unfinished) build directory, not a store")
    if not (p / "zarr.json").is_file():
        raise StoreError(f"{p} is not a Zarr v3 group (no zarr.json); is the path right?")
    try:
        root = zarr.open_group(retry.store_for(p), mode="r")  # plain path = zarrs fast path (data/retry.py)
    except Exception as exc:
        raise StoreError(f"cannot open {p} as a Zarr group: {exc}") from exc
    attrs = dict(root.attrs)
    if attrs.get("format") != keys.STORE_FORMAT:
        raise StoreError(f"{p}: attribute 'format' is {attrs.get('format')!r}, expected {keys.STORE_FORMAT!r}")
    if attrs.get("schema_version") != keys.SCHEMA_VERSION:
        raise StoreError(f"{p}: schema_version {attrs.get('schema_version')!r} is not supported "
                         f"(this code reads {keys.SCHEMA_VERSION})")
    if attrs.get("complete") is not True:
        raise StoreError(f"{p}: store is incomplete (complete != true): the build was interrupted")
    return Store(p, root)


def _identity(path: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of the store's root zarr.json, written last by every build; None once it is
    gone. Not the directory's inode: FUSE mounts may renumber inodes while a job runs."""
    try:
        st = os.stat(path / "zarr.json")
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


class Store:
    def __init__(self, path: Path, root: zarr.Group):
        self.path = path
        self.root = root
        # A rebuild replaces the directory (tmp + rename), and zarr opens files by path: a reader holding
        # this store's indptrs and cell table then gathered the new arrays' entries as garbage rows.
        self.identity = _identity(path)
        self._files_verified: bool | None = None  # verify_files() has not run yet
        self._obs_checked = False
        a = dict(root.attrs)
        # the feature tables are read here, before any stream would check the manifest: a lost file of theirs
        # read as empty names or zero positions (zarr's fill value), or ended in a bare KeyError
        self.verify_files()
        feats_rna, feats_atac = _read_features(root, path, keys.RNA), _read_features(root, path, keys.ATAC)
        self.meta = StoreMeta(
            n_cells=int(a["n_cells"]), n_genes=int(a["n_genes"]), n_regions=int(a["n_regions"]),
            gene_names=[str(x) for x in feats_rna.index], region_names=[str(x) for x in feats_atac.index],
            batch_key=a["batch_key"], batch_categories=list(a["batch_categories"]),
            cat_cov_keys=list(a["cat_cov_keys"]), cat_cov_categories={k: list(v) for k, v in
                                                                       a["cat_cov_categories"].items()},
            cont_cov_keys=list(a["cont_cov_keys"]), label_key=a.get("label_key"),
            label_categories=list(a.get("label_categories") or []),
            shard_offsets=[int(o) for o in a["shard_offsets"]],
            n_cells_rna=int(a.get("n_cells_rna", 0)), n_cells_atac=int(a.get("n_cells_atac", 0)),
            source=dict(a.get("source") or {}), codec=str(a.get("codec", "lz4")),
        )
        self.features = {keys.RNA: feats_rna, keys.ATAC: feats_atac}
        if self.meta.shard_offsets[-1] != self.meta.n_cells or len(self.meta.shard_offsets) - 1 != a["n_shards"]:
            raise StoreError(f"{path}: shard_offsets {self.meta.shard_offsets[:3]}... disagree with "
                             f"n_cells={self.meta.n_cells} / n_shards={a['n_shards']}")

    def check_unchanged(self, identity: tuple[int, int] | None = None) -> None:
        """Raise :class:`StoreError` if the store at ``path`` is no longer the one opened (or the one of
        ``identity``): its root zarr.json was rewritten, i.e. the store was rebuilt or moved while read."""
        if _identity(self.path) != (identity or self.identity):
            raise StoreError(f"{self.path} was replaced while it was being read (rebuilt in place?): what this "
                             "job read of it no longer matches the files; restart the job")

    def __repr__(self) -> str:
        m = self.meta
        return (f"Store({self.path}, {m.n_cells} cells x {m.n_genes} genes x {m.n_regions} regions, "
                f"{m.n_shards} shards)")

    # ------------------------------------------------------------------------------ per shard
    def shard_path(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:05d}"

    def shard_group(self, shard: int) -> zarr.Group:
        return self.root[f"shards/{shard:05d}"]

    def csr_arrays(self, modality: str, shard: int) -> tuple[zarr.Array, zarr.Array, zarr.Array]:
        """Raw (data, indices, indptr) zarr arrays of one shard's modality (indptr is shard-local)."""
        if modality not in keys.MODALITIES:
            raise KeyError(f"modality must be one of {keys.MODALITIES}, got {modality!r}")
        x = self.root[f"shards/{shard:05d}/mod/{modality}/X"]
        return x["data"], x["indices"], x["indptr"]

    def indptr(self, modality: str, shard: int) -> np.ndarray:
        """Shard-local CSR indptr (int64), cached: the loader needs it for every gather."""
        return self._indptrs[(modality, shard)]

    @cached_property
    def _indptrs(self) -> _IndptrCache:
        return _IndptrCache(self)

    def verify_files(self) -> bool:
        """Check the build's file manifest once per opened store (data/manifest.py: a lost or truncated file
        is a StoreReadError naming it); False for a store built without a manifest."""
        if self._files_verified is None:
            from data.manifest import verify_manifest  # data.manifest imports this module

            self._files_verified = verify_manifest(self.path)
        return self._files_verified

    def check_obs(self) -> None:
        """Refuse lost obs chunk files (once per opened store): by the manifest, or for a store built before
        it, by what the missing chunks' zeros would contradict (data/obs_chunks.py)."""
        if not self._obs_checked:
            if not self.verify_files():
                from data.obs_chunks import check_obs_chunks  # data.obs_chunks imports this module

                check_obs_chunks(self)
            self._obs_checked = True

    def check_csr(self, modality: str, shard: int, ptr: np.ndarray) -> None:
        """Refuse a shard's CSR arrays whose chunk files are lost (raise :class:`StoreReadError`).

        zarr reads a missing chunk file as the fill value, 0, without an error: a deleted ``data`` file
        trained on zeros and a deleted ``indices`` file moved every count to column 0, silently. A file
        is legitimately absent only when its whole chunk is 0 (zarr skips writing those), so a missing
        chunk is accepted only where zeros are possible: never for ``data`` (counts are >= 1, the build
        drops stored zeros), for ``indices`` only when its entries all sit in different rows (indices
        are increasing within a row), for ``indptr`` only when the row the zeros would leave holding
        every earlier entry has at most one entry per column. A store with a file manifest is checked by
        it instead (``verify_files``); this per-chunk check is for stores built before it."""
        data, indices, indptr = self.csr_arrays(modality, shard)
        where = f"{self.shard_path(shard)}/mod/{modality}/X"
        nnz = data.shape[0]
        if indices.shape[0] != nnz or len(ptr) == 0 or ptr[0] != 0 or ptr[-1] != nnz or np.any(np.diff(ptr) < 0):
            raise StoreReadError(f"{where}: indptr (ends at {ptr[-1] if len(ptr) else None}) does not describe "
                                 f"data/indices of {nnz}/{indices.shape[0]} entries (a lost or corrupted file: "
                                 "rebuild or restore the store)")
        if self.verify_files():
            return  # every file of the build is there at its size: no chunk file can be missing
        n_cols = self.meta.n_genes if modality == keys.RNA else self.meta.n_regions

        def zeros_possible(name: str, a: int, b: int) -> bool:
            if name == "data":
                return False
            if name == "indices":  # entries a..b-1 lie in rows r0..r1: at most one in each of them
                r0, r1 = np.searchsorted(ptr, [a, b - 1], side="right") - 1
                return bool(np.all(np.minimum(ptr[r0 + 1:r1 + 2], b) - np.maximum(ptr[r0:r1 + 1], a) <= 1))
            return b == len(ptr) or int(ptr[b]) <= n_cols  # indptr

        for name, arr in (("data", data), ("indices", indices), ("indptr", indptr)):
            step = int(arr.metadata.chunk_grid.chunk_shape[0])
            for a in range(0, arr.shape[0], step):
                key = arr.metadata.encode_chunk_key((a // step,))
                if not (self.path / arr.path / key).exists() and not zeros_possible(name, a, min(a + step, arr.shape[0])):
                    raise StoreReadError(f"{where}/{name}/{key} is missing (zarr would read its entries [{a}, "
                                         f"{min(a + step, arr.shape[0])}) as zeros): a lost file, rebuild or "
                                         "restore the store")

    def read_rows(self, modality: str, shard: int, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` (shard-local) of one modality as CSR with the stored integer dtype."""
        n_cols = self.meta.n_genes if modality == keys.RNA else self.meta.n_regions
        size = self.meta.shard_offsets[shard + 1] - self.meta.shard_offsets[shard]
        if not 0 <= start <= stop <= size:
            raise IndexError(f"rows [{start}, {stop}) out of range for shard {shard} with {size} rows")
        data, indices, _ = self.csr_arrays(modality, shard)
        ptr = self.indptr(modality, shard)
        lo, hi = int(ptr[start]), int(ptr[stop])
        out = sp.csr_matrix((data[lo:hi], indices[lo:hi], ptr[start:stop + 1] - lo), shape=(stop - start, n_cols))
        # the indptr is cached and zarr opens files by path: after a rebuild in place the slices came from the
        # new store's arrays at the old store's offsets, other cells' counts without an error
        self.check_unchanged()
        return out

    def read_shard_obs(self, shard: int) -> pd.DataFrame:
        self.check_obs()  # a lost chunk file would read as zeros
        obs = read_elem(self.root[f"shards/{shard:05d}/obs"])
        self.check_unchanged()  # the new store's cells under the old one's shard offsets and categories
        return obs

    def read_obs(self) -> pd.DataFrame:
        """Every per-cell column over all shards, in global row order (index = cell id)."""
        parts = [self.read_shard_obs(i) for i in range(self.meta.n_shards)]
        obs = pd.concat(parts) if len(parts) > 1 else parts[0]
        # Categoricals share categories across shards (the store fixes them), so concat keeps them.
        return obs

    def read_stats(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(read_elem(v)) for k, v in self.root["stats"].members()}


def _read_features(root: zarr.Group, path: Path, modality: str) -> pd.DataFrame:
    """``features/<modality>``; :class:`StoreReadError` when it is gone or its names repeat (a store without a
    manifest that lost a chunk of names: zarr reads them as "", and the build writes unique names)."""
    try:
        df = read_elem(root[f"features/{modality}"])
    except (KeyError, FileNotFoundError) as exc:
        raise StoreReadError(f"{path}/features/{modality} cannot be read ({type(exc).__name__}: {exc}): a lost "
                             "file, rebuild or restore the store") from None
    if not df.index.is_unique:
        raise StoreReadError(f"{path}/features/{modality}: feature names repeat (e.g. "
                             f"{df.index[df.index.duplicated()][0]!r}), which no build writes: a lost chunk file "
                             "(zarr reads it as empty names); rebuild or restore the store")
    return df


class _IndptrCache(dict):
    def __init__(self, store: Store):
        super().__init__()
        self._store = store

    def __missing__(self, key: tuple[str, int]) -> np.ndarray:
        _, _, ptr = self._store.csr_arrays(*key)
        val = np.asarray(retry.read_array(ptr), dtype=np.int64)
        self._store.check_csr(*key, val)
        self[key] = val
        return val
