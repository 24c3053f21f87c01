"""The store's on-disk encoding of cells: what one shard group holds and how it is written.

:class:`StoreSchema` fixes the obs and feature columns every cell carries; :func:`normalize_obs` and
:func:`feature_frame` turn a block's tables into exactly those columns; :func:`write_shard` writes one
MuData-layout group ``shards/<idx:05d>`` with its count arrays compressed by the store's codec
(:data:`CODECS`). Shared by :class:`data.writer.StoreWriter` (serial builds) and the Dask build's tasks
(data/dask_build.py), which write shards without a writer of their own. Schema in docs/store.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import write_elem
from zarr.codecs import BloscCodec, ZstdCodec

from data import keys
from data.split import cell_hash

# Rows per Zarr chunk / shard of the CSR arrays (stack notes §4: small chunks for fast shuffled reads,
# shards so that the directory does not explode into millions of files).
CHUNK_ROWS = 256
SHARD_CHUNKS = 64
# Compression of the count arrays (data / indices / indptr), a store-level choice recorded in the root
# attribute ``codec`` (docs/store.md). All three are decoded natively by zarrs (Rust), so none of them
# drops reads into Python. "lz4" (blosc lz4 + byte shuffle) is what every store had before the option.
CODECS = ("lz4", "zstd", "none")
DEFAULT_CODEC = "lz4"


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


OBS_RESERVED = ("mask_rna", "mask_atac", "lib_rna", "lib_atac", "split_hash", "cell_index")


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


def parse_regions(names: list[str]) -> pd.DataFrame:
    """chrom/start/end from region names like ``chr1:100-200`` or ``chr1-100-200`` (empty if not parseable)."""
    s = pd.Series(names, dtype=str)
    parts = s.str.extract(r"^(?P<chrom>.+?)[:\-_](?P<start>\d+)[\-_](?P<end>\d+)$")
    if len(s) == 0 or parts.isna().any().any():
        return pd.DataFrame(index=pd.Index(names, dtype=str))
    return pd.DataFrame({"chrom": parts["chrom"].values, "start": parts["start"].astype(np.int64).values,
                         "end": parts["end"].astype(np.int64).values}, index=pd.Index(names, dtype=str))


def feature_frame(names: list[str], extra: pd.DataFrame | None, parse: bool) -> pd.DataFrame:
    """The store's feature table for ``names``: parsed region coordinates (``parse``), then the columns
    of ``extra`` not already present. Raises ValueError on a duplicate name."""
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


def write_settings(**extra: Any):
    """anndata write settings: zarr v3, and our own explicit shards instead of anndata's auto-sharding."""
    return ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False, **extra)


def smallest_uint(max_value: int) -> np.dtype:
    """Smallest unsigned dtype (at least uint8) that holds ``max_value``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"count {max_value} does not fit in uint64")


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
    with write_settings(write_csr_csc_indices_with_min_possible_dtype=True):
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