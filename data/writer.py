"""StoreWriter: append blocks of cells, get a sharded Zarr v3 atlas store (schema in docs/store.md).

Memory is bounded by one shard: blocks are buffered until ``shard_size`` cells are collected, the shard
is written with anndata's element writers (so every shard opens with ``mudata.read_zarr``) and the
buffer is dropped. Per-batch RNA library statistics and per-feature detection counts are accumulated
as blocks arrive (data/store_stats.py), so nothing is ever re-read. Shards written elsewhere (the Dask
build's tasks) are accounted for with :meth:`StoreWriter.register_shard`. The store is written under ``<out>.tmp-<random>`` and
renamed to ``<out>`` only by :meth:`StoreWriter.close`, after ``complete: true`` is set: a build that dies
halfway leaves a ``.tmp-`` directory that :func:`data.store.open_store` refuses.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import write_elem
from zarr.codecs import BloscCodec, ZstdCodec

from data import keys, leftovers
from data.manifest import write_manifest
from data.split import cell_hash
from data.store_stats import BlockStats, block_stats

# Rows per Zarr chunk / shard of the CSR arrays (stack notes §4: small chunks for fast shuffled reads,
# shards so that the directory does not explode into millions of files).
CHUNK_ROWS = 256
SHARD_CHUNKS = 64
# Compression of the count arrays (data / indices / indptr), a store-level choice recorded in the root
# attribute ``codec`` (docs/store.md). All three are decoded natively by zarrs (Rust), so none of them
# drops reads into Python. "lz4" (blosc lz4 + byte shuffle) is what every store had before the option.
CODECS = ("lz4", "zstd", "none")
DEFAULT_CODEC = "lz4"
OBS_RESERVED = ("mask_rna", "mask_atac", "lib_rna", "lib_atac", "split_hash", "cell_index")


def check_codec(codec: str) -> str:
    """``codec`` if it is one of :data:`CODECS`, else a ValueError that lists the choices."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not supported; choose one of {', '.join(CODECS)} "
                         f"(lz4 = default, zstd = smallest on disk, none = uncompressed, fastest to read)")
    return codec


def count_compressors(codec: str) -> list:
    """zarr v3 compressors of the count arrays for a store ``codec`` (see :data:`CODECS`)."""
    check_codec(codec)
    if codec == "lz4":
        return [BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")]
    if codec == "zstd":  # zarr's own default level; ~15 % smaller than lz4 here, ~1.7x slower to decode
        return [ZstdCodec(level=0)]
    return []  # "none": the sharding codec's bytes only (still checksummed shard indexes)


def store_codec(root: zarr.Group) -> str:
    """The codec a shard written into ``root`` must use: the store's ``codec`` attribute. ``root`` is the
    store itself (StoreWriter) or a staging group inside the store's temporary directory
    (``<tmp>/.staging/<id>``, data/dask_build.py), in which case the attribute is read from the nearest
    enclosing store. A store written before the attribute existed is "lz4"."""
    if root.attrs.get("format") == keys.STORE_FORMAT:
        return check_codec(root.attrs.get("codec", DEFAULT_CODEC))
    here = Path(str(root.store.root)) / root.path if hasattr(root.store, "root") else None
    for parent in (here.parents if here is not None else []):
        meta = parent / "zarr.json"
        if meta.is_file():
            attrs = json.loads(meta.read_text()).get("attributes", {})
            if attrs.get("format") == keys.STORE_FORMAT:
                return check_codec(attrs.get("codec", DEFAULT_CODEC))
    raise ValueError(f"cannot tell the store codec for shard group {root}: pass codec= to write_shard")


def is_store_dir(path: Path) -> bool:
    """A directory whose root zarr.json carries the store format marker (complete or not)."""
    meta = Path(path) / "zarr.json"
    try:
        return meta.is_file() and json.loads(meta.read_text()).get("attributes", {}).get("format") == keys.STORE_FORMAT
    except (OSError, ValueError):
        return False


class StoreExistsError(FileExistsError):
    """The output path exists and overwrite was not requested."""


@dataclass
class StoreSchema:
    """What every cell of the store carries besides counts (fixed before the first block)."""

    gene_names: list[str]
    region_names: list[str]
    batch_key: str = "batch"
    batch_categories: list[str] = field(default_factory=lambda: ["0"])
    cat_cov_keys: list[str] = field(default_factory=list)
    cat_cov_categories: dict[str, list[str]] = field(default_factory=dict)
    cont_cov_keys: list[str] = field(default_factory=list)
    label_key: str | None = None
    label_categories: list[str] = field(default_factory=list)
    rna_var: pd.DataFrame | None = None  # extra gene columns; index must equal gene_names
    atac_var: pd.DataFrame | None = None  # region columns (chrom/start/end added when parseable)


def smallest_uint(max_value: int) -> np.dtype:
    """Smallest unsigned dtype (at least uint8) that holds ``max_value``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"count {max_value} does not fit in uint64")


def parse_regions(names: list[str]) -> pd.DataFrame:
    """chrom/start/end from region names like ``chr1:100-200`` or ``chr1-100-200`` (empty if not parseable)."""
    s = pd.Series(names, dtype=str)
    parts = s.str.extract(r"^(?P<chrom>.+?)[:\-_](?P<start>\d+)[\-_](?P<end>\d+)$")
    if len(s) == 0 or parts.isna().any().any():
        return pd.DataFrame(index=pd.Index(names, dtype=str))
    return pd.DataFrame({"chrom": parts["chrom"].values, "start": parts["start"].astype(np.int64).values,
                         "end": parts["end"].astype(np.int64).values}, index=pd.Index(names, dtype=str))


def _feature_frame(names: list[str], extra: pd.DataFrame | None, parse: bool) -> pd.DataFrame:
    df = parse_regions(names) if parse else pd.DataFrame(index=pd.Index(names, dtype=str))
    if extra is not None:
        extra = extra.copy()
        extra.index = pd.Index(names, dtype=str)
        for col in extra.columns:
            if col not in df.columns:
                df[col] = _with_missing(extra[col])
    if not df.index.is_unique:
        dup = df.index[df.index.duplicated()][0]
        raise ValueError(f"duplicate feature name {dup!r}")
    df.index.name = None
    return df


def _with_missing(col: pd.Series):
    """A feature column as anndata writes it faithfully: a missing value of a text (object) column would be
    written as the text "nan", so such a column becomes a categorical (missing = NaN). A bool column with
    gaps (scanpy's ``highly_variable`` of only some inputs, feature_join=union) is an object column too: it
    stays bool, as pandas' nullable boolean, not the text categories "False" / "True"."""
    if col.dtype != object or not col.isna().any():
        return col.values
    if col.notna().any() and col.dropna().map(lambda v: isinstance(v, (bool, np.bool_))).all():
        return pd.array(col.where(col.notna(), None).tolist(), dtype="boolean")
    return pd.Categorical(np.where(col.notna(), col.astype(str), None))


def normalize_obs(schema: StoreSchema, obs: pd.DataFrame, first_index: int) -> pd.DataFrame:
    """The store's obs columns of a block: declared categories, masks, split hash, and ``cell_index``
    numbered from ``first_index`` (the global row of the block's first cell). Raises KeyError / ValueError
    on a missing column or an undeclared category."""
    s = schema
    out = pd.DataFrame(index=pd.Index(obs.index.astype(str), dtype=str))
    needed = [s.batch_key, *s.cat_cov_keys, *s.cont_cov_keys, "mask_rna", "mask_atac"]
    missing = [c for c in needed if c not in obs.columns]
    if missing:
        raise KeyError(f"obs block lacks column(s) {missing}")
    cats = {s.batch_key: s.batch_categories, **s.cat_cov_categories}
    if s.label_key is not None:
        cats[s.label_key] = s.label_categories
    for key in [s.batch_key, *s.cat_cov_keys] + ([s.label_key] if s.label_key else []):
        raw = obs[key] if key in obs.columns else pd.Series(np.full(len(obs), None, object))
        present = raw.notna().to_numpy()
        vals = np.where(present, raw.astype(str).to_numpy(), None)
        col = pd.Categorical(vals, categories=list(cats[key]))
        # Labels may be unknown (NaN); batch and covariates must be one of the declared categories.
        unknown = pd.isna(col) & present if key == s.label_key else pd.isna(col)
        if np.any(unknown):
            i = np.flatnonzero(unknown)[0]
            raise ValueError(f"column {key!r}: value {vals[i]!r} of cell {out.index[i]!r} is missing "
                             f"or not a declared category")
        out[key] = col
    for key in s.cont_cov_keys:
        out[key] = obs[key].to_numpy(dtype=np.float32)
    out["mask_rna"] = obs["mask_rna"].to_numpy(dtype=bool)
    out["mask_atac"] = obs["mask_atac"].to_numpy(dtype=bool)
    out["split_hash"] = cell_hash(out.index)
    out["cell_index"] = np.arange(first_index, first_index + len(obs), dtype=np.int64)
    if out.index.name in out.columns:  # e.g. an input index named "cell_index": anndata refuses to write that
        out.index.name = None
    return out


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
        self.rna_var = _feature_frame(list(schema.gene_names), schema.rna_var, parse=False)
        self.atac_var = _feature_frame(list(schema.region_names), schema.atac_var, parse=True)
        self.n_genes, self.n_regions = len(self.rna_var), len(self.atac_var)
        with _settings():
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
        with _settings():
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


def _settings(**extra: Any):
    """anndata write settings: zarr v3, and our own explicit shards instead of anndata's auto-sharding."""
    return ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False, **extra)


def _version() -> str:
    try:
        return importlib.metadata.version("multivi-atlas")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _csr_kwargs(x: sp.csr_matrix, codec: str) -> dict[str, Any]:
    """Chunks of ~CHUNK_ROWS rows' worth of nnz, shards of SHARD_CHUNKS chunks, the store's codec."""
    per_row = x.nnz / max(x.shape[0], 1)
    chunk = max(1024, int(np.ceil(per_row * CHUNK_ROWS)))
    return {"chunks": (chunk,), "shards": (chunk * SHARD_CHUNKS,), "compressors": count_compressors(codec)}


def write_shard(root: zarr.Group, idx: int, rna: sp.csr_matrix, atac: sp.csr_matrix, obs: pd.DataFrame,
                rna_var: pd.DataFrame, atac_var: pd.DataFrame, *, codec: str | None = None) -> None:
    """One MuData-layout group ``shards/<idx:05d>`` (what ``mudata.read_zarr`` expects). ``codec`` of the
    count arrays: given, or the enclosing store's ``codec`` attribute (:func:`store_codec`)."""
    codec = check_codec(codec) if codec is not None else store_codec(root)
    g = root.require_group(f"shards/{idx:05d}")
    n = len(obs)
    g.attrs.update({"encoding-type": "MuData", "encoding-version": "0.1.0", "axis": 0})
    index_only = pd.DataFrame(index=obs.index)
    with _settings(write_csr_csc_indices_with_min_possible_dtype=True):
        write_elem(g, "obs", obs)
        var = pd.DataFrame(index=pd.Index(list(rna_var.index) + list(atac_var.index), dtype=str))
        write_elem(g, "var", var)
        for name in ("obsm", "varm", "obsp", "varp", "uns"):
            write_elem(g, name, {})
        ones = np.arange(1, n + 1, dtype=np.uint32)
        write_elem(g, "obsmap", {keys.RNA: ones, keys.ATAC: ones})
        G, R = len(rna_var), len(atac_var)
        write_elem(g, "varmap", {
            keys.RNA: np.concatenate([np.arange(1, G + 1), np.zeros(R, np.int64)]).astype(np.uint32),
            keys.ATAC: np.concatenate([np.zeros(G, np.int64), np.arange(1, R + 1)]).astype(np.uint32)})
        mod = g.require_group("mod")
        mod.attrs.update({"mod-order": [keys.RNA, keys.ATAC]})
        for name, x, var_df in ((keys.RNA, rna, rna_var), (keys.ATAC, atac, atac_var)):
            write_elem(mod, name, ad.AnnData(obs=index_only, var=var_df))
            x = sp.csr_matrix(x)
            x.sort_indices()
            maxc = int(x.data.max()) if x.nnz else 0
            x = sp.csr_matrix((x.data.astype(smallest_uint(maxc)), x.indices, x.indptr.astype(np.int64)),
                              shape=x.shape)
            write_elem(mod[name], "X", x, dataset_kwargs=_csr_kwargs(x, codec))
