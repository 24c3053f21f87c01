"""Lost obs chunk files of a store built before the file manifest (data/manifest.py).

zarr reads a missing chunk file as the array's fill value without an error, and writes no file for a chunk
that is all fill value, so a missing file is either an all-zero chunk or a lost one. For the columns where
zeros can be told apart from a loss, a missing file is refused (``StoreReadError`` naming it):

* ``split_hash``, the cell ids and the category names: never all zero / empty (a lost ``split_hash`` chunk
  put every one of its cells in the validation split);
* ``cell_index``: zero only on global row 0;
* ``mask_<mod>`` and ``lib_<mod>``: all False / 0 only for cells without counts in that modality (the
  shard's own indptr says which): a lost ``mask_atac`` chunk made measured cells RNA-only;
* the batch codes: all 0 (the first batch) is legal, but the store's ``rna_cells_per_batch`` statistic
  counts the RNA cells of each batch, so a lost chunk of cells of other batches shows as a mismatch.

Covariate and label codes and continuous covariates have no such witness: a lost file of theirs still reads
as zeros. Stores with a manifest are checked by it instead (every file, one ``stat`` each).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from data import keys
from data.retry import read_array
from data.store import Store, StoreReadError


def _missing(root: Path, arr: zarr.Array) -> list[tuple[int, int, str]]:
    """[a, b) and key of every chunk of the 1-D ``arr`` whose file is not on disk."""
    n, step = arr.shape[0], int(arr.metadata.chunk_grid.chunk_shape[0])
    out = []
    for a in range(0, n, step):
        key = arr.metadata.encode_chunk_key((a // step,))
        if not (root / arr.path / key).exists():
            out.append((a, min(a + step, n), key))
    return out


def check_obs_chunks(store: Store) -> None:
    """Raise :class:`StoreReadError` naming the obs chunk files of ``store`` that are provably lost."""
    m = store.meta
    lost, batch_missing = [], []
    for s in range(m.n_shards):
        obs = store.shard_group(s)["obs"]
        index_name = obs.attrs.get("_index", "_index")
        for name, node in obs.members():
            parts = ([(f"{name}/codes", node["codes"]), (f"{name}/categories", node["categories"])]
                     if isinstance(node, zarr.Group) else [(name, node)])
            for label, arr in parts:
                for a, b, key in _missing(store.path, arr):
                    where = f"{store.shard_path(s)}/obs/{label}/{key}"
                    if label.endswith("/categories") or name in (index_name, "split_hash"):
                        lost.append(where)
                    elif name == "cell_index":
                        if (m.shard_offsets[s] + a, b) != (0, 1):
                            lost.append(where)
                    elif name in ("mask_rna", "lib_rna", "mask_atac", "lib_atac"):
                        ptr = store.indptr(keys.RNA if name.endswith("rna") else keys.ATAC, s)
                        if ptr[b] != ptr[a]:  # cells with counts: measured, with a library above 0
                            lost.append(where)
                    elif name == m.batch_key:
                        batch_missing.append(where)
    if batch_missing and not lost and "rna_cells_per_batch" in store.root["stats"]:
        counted = np.zeros(m.n_batch, np.int64)
        for s in range(m.n_shards):
            obs = store.shard_group(s)["obs"]
            codes = np.asarray(read_array(obs[m.batch_key]["codes"]), np.int64)
            rna = np.asarray(read_array(obs["mask_rna"]), bool)
            counted += np.bincount(codes[rna & (codes >= 0)], minlength=m.n_batch)[:m.n_batch]
        expected = np.asarray(read_array(store.root["stats/rna_cells_per_batch"]), np.int64)
        if not np.array_equal(counted, expected):
            lost += batch_missing
    if lost:
        raise StoreReadError(f"{store.path}: obs chunk files are missing ({len(lost)}, e.g. {lost[:3]}); zarr would "
                             "read them as zeros (other masks, batches or split): a lost file, rebuild or restore "
                             "the store")
