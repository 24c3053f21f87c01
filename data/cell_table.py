"""The per-cell table of the streaming loader: compact numeric arrays over the whole store, read once.

Codes, masks, covariates and library sizes, in global row order, never the string cell ids: memory grows by
a few bytes per cell, so a 1M-cell store costs about the same as a 50k one. Also the validation mask from
the stored split hashes. The count rows are read by ``data.reader.ChunkReader``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import zarr

from data.retry import read_array
from data.split import is_validation
from data.store import Store, open_store


@dataclass
class CellTable:
    """Per-cell arrays over the whole store, in global row order."""

    batch: np.ndarray  # (n,) signed integer batch codes (the stored code width, int8 or wider)
    cat_covs: np.ndarray  # (n, K) signed integer codes
    cont_covs: np.ndarray  # (n, C) float32
    label: np.ndarray | None  # (n,) signed integer codes, -1 unknown; None when the store has no labels
    mask: np.ndarray  # (n, 2) bool [RNA measured, ATAC measured]
    library: np.ndarray  # (n, 2) float32 [RNA, ATAC] total counts (for size factors)
    # largest measured ATAC total (>= 1): the denominator of the ATAC size factor (data.collate)
    atac_library_max: float = 1.0


def _column(obs: zarr.Group, name: str) -> np.ndarray:
    """One obs column: the codes of a categorical (-1 = missing) or the plain array."""
    node = obs[name]
    if isinstance(node, zarr.Group):  # anndata writes categoricals as {codes, categories}
        return np.asarray(read_array(node["codes"]))
    return np.asarray(read_array(node))


def as_store(store: Store | str | os.PathLike) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def read_validation_mask(store: Store, val_fraction: float, digest=None) -> np.ndarray:
    """Boolean validation mask of every cell (global row order), from the stored ``split_hash``.

    Shard by shard, so the only per-cell array kept is the 1-byte mask, not the 8-byte hashes. A
    ``hashlib`` object given as ``digest`` is updated with every shard's size and id hashes: which cell
    sits on which row, at no extra read (the loader's resume check)."""
    store.check_obs()  # a lost split_hash chunk would put its cells in validation
    parts = []
    for h in _split_hashes(store):
        if digest is not None:
            digest.update(np.int64(len(h)).tobytes())
            digest.update(np.ascontiguousarray(h).tobytes())
        parts.append(is_validation(h, val_fraction))
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def cells_fingerprint(store: Store) -> str:
    """Which cell sits on which global row of ``store`` (its cells' id hashes in row order), whatever the
    shard layout: a model with per-cell weights tells its training store's cells, in their order, from a
    rebuild of other cells or of the same cells in another order."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for h in _split_hashes(store):
        digest.update(np.ascontiguousarray(h).tobytes())
    return digest.hexdigest()


def _split_hashes(store: Store) -> Iterator[np.ndarray]:
    """Each shard's per-cell id hashes (uint64), shard by shard in global row order."""
    for i in range(store.meta.n_shards):
        yield _column(store.shard_group(i)["obs"], "split_hash").astype(np.uint64, copy=False)


def _code_dtype(obs_groups: list[zarr.Group], name: str) -> np.dtype:
    """Narrowest signed dtype holding the codes of ``name`` in every shard (metadata only, no reads).

    Categorical codes are stored as int8/int16 by anndata; keeping that width (instead of int32) saves
    2-3 bytes per cell per column, and ``collate`` widens the batch's rows to int64 anyway."""
    dt = np.dtype(np.int8)
    for obs in obs_groups:
        node = obs[name]
        arr = node["codes"] if isinstance(node, zarr.Group) else node
        code = np.dtype(arr.dtype)
        if code.kind not in "iub":
            raise TypeError(f"obs column {name!r} must be categorical or integer codes, got dtype {code}")
        dt = np.promote_types(dt, code)
    if dt.kind == "u":  # unsigned codes: the next signed width (-1 stays the missing code)
        dt = np.promote_types(dt, np.int8)
    return dt


def read_cell_table(store: Store) -> CellTable:
    """Compact per-cell arrays (see :class:`CellTable`) over all shards.

    The output arrays are allocated once and filled shard by shard: the only transient is one shard's
    column (the former concatenate-then-stack built every column twice more over the whole store, an
    extra ~50 bytes per cell of peak RSS that glibc then kept, issue #5). Only the needed obs columns
    are read, straight from zarr (never the string cell ids)."""
    store.check_obs()  # a lost mask or batch chunk would read as zeros
    m = store.meta
    n = m.n_cells
    names = [m.batch_key, *m.cat_cov_keys, *m.cont_cov_keys, "mask_rna", "mask_atac", "lib_rna", "lib_atac"]
    if m.label_key:
        names.append(m.label_key)
    obs_groups = []
    for i in range(m.n_shards):
        obs = store.shard_group(i)["obs"]
        for name in names:
            if name not in obs:
                raise KeyError(f"{store.shard_path(i)}/obs has no column {name!r} (store schema mismatch)")
        obs_groups.append(obs)
    K, C = len(m.cat_cov_keys), len(m.cont_cov_keys)
    cat_dt = (np.result_type(*[_code_dtype(obs_groups, k) for k in m.cat_cov_keys]) if K
              else np.dtype(np.int8))
    table = CellTable(
        batch=np.empty(n, _code_dtype(obs_groups, m.batch_key)),
        cat_covs=np.empty((n, K), cat_dt),
        cont_covs=np.empty((n, C), np.float32),
        label=np.empty(n, _code_dtype(obs_groups, m.label_key)) if m.label_key else None,
        mask=np.empty((n, 2), bool),
        library=np.empty((n, 2), np.float32),
    )
    offsets = np.asarray(m.shard_offsets, dtype=np.int64)
    top = 1.0
    for i, obs in enumerate(obs_groups):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        targets = [(table.batch[lo:hi], m.batch_key)]
        targets += [(table.cat_covs[lo:hi, j], k) for j, k in enumerate(m.cat_cov_keys)]
        targets += [(table.cont_covs[lo:hi, j], k) for j, k in enumerate(m.cont_cov_keys)]
        if m.label_key:
            targets.append((table.label[lo:hi], m.label_key))
        targets += [(table.mask[lo:hi, 0], "mask_rna"), (table.mask[lo:hi, 1], "mask_atac"),
                    (table.library[lo:hi, 0], "lib_rna"), (table.library[lo:hi, 1], "lib_atac")]
        for out, name in targets:
            col = _column(obs, name)
            if len(col) != hi - lo:
                raise ValueError(f"{store.shard_path(i)}/obs/{name} has {len(col)} rows, the store metadata "
                                 f"says {hi - lo}")
            out[...] = col  # casts in place (codes keep their width, counts -> float32)
        measured = table.library[lo:hi, 1][table.mask[lo:hi, 1]]
        if measured.size:
            top = max(top, float(measured.max()))
    table.atac_library_max = top  # accumulated per shard (starts at 1): no whole-store temporary
    return table
