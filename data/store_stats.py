"""The store's ``stats/`` (docs/store.md): per-block partial sums, merged in a fixed order, finished once.

One implementation for every build path: :class:`data.writer.StoreWriter` computes a block's
:func:`block_stats` as cells are appended, and a Dask shard task (data/dask_build.py) computes its
shard's on the worker; either way the client adds the partials with :meth:`BlockStats.add` in arrival /
shard order and writes :meth:`BlockStats.arrays`. Keeping the arithmetic here (and its order in the
callers) is what makes the stats of the in-process and cluster builds equal to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data import keys


def detection_counts(x: sp.csr_matrix, n_cols: int) -> np.ndarray:
    """Per column, the number of rows with a nonzero count (int64)."""
    return np.bincount(x.indices[x.data > 0], minlength=n_cols).astype(np.int64)


@dataclass
class BlockStats:
    """Partial sums over some cells: detection counts, measured cells, per-batch RNA log-library moments."""

    det: dict[str, np.ndarray]  # modality -> per-feature count of cells with a nonzero count
    n_measured: dict[str, int]  # modality -> cells where it was measured
    lib_sum: np.ndarray  # per batch: sum of log RNA library size over RNA-measured cells (float64)
    lib_sq: np.ndarray  # ... sum of its square
    lib_n: np.ndarray  # ... number of those cells (int64)

    @classmethod
    def zeros(cls, n_genes: int, n_regions: int, n_batches: int) -> BlockStats:
        return cls({keys.RNA: np.zeros(n_genes, np.int64), keys.ATAC: np.zeros(n_regions, np.int64)},
                   {keys.RNA: 0, keys.ATAC: 0}, np.zeros(n_batches), np.zeros(n_batches), np.zeros(n_batches, np.int64))

    def add(self, other: BlockStats) -> None:
        """Add ``other`` in place (float sums depend on the order: callers add in a fixed order)."""
        for mod in (keys.RNA, keys.ATAC):
            self.det[mod] += other.det[mod]
            self.n_measured[mod] += other.n_measured[mod]
        self.lib_sum += other.lib_sum
        self.lib_sq += other.lib_sq
        self.lib_n += other.lib_n

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays written under ``stats/``."""
        n = np.maximum(self.lib_n, 1)
        mean = self.lib_sum / n
        var = np.maximum(self.lib_sq / n - mean ** 2, 0.0)
        return {
            "rna_library_log_mean": mean.astype(np.float32),
            "rna_library_log_var": var.astype(np.float32),
            "rna_detection_rate": (self.det[keys.RNA] / max(self.n_measured[keys.RNA], 1)).astype(np.float32),
            "atac_detection_rate": (self.det[keys.ATAC] / max(self.n_measured[keys.ATAC], 1)).astype(np.float32),
            "rna_cells_per_batch": self.lib_n.astype(np.int64),
        }


def block_stats(rna: sp.csr_matrix, atac: sp.csr_matrix, obs: pd.DataFrame, batch_key: str,
                n_batches: int) -> BlockStats:
    """Stats of one block of normalised cells (``data.store_format.normalize_obs``); adds ``lib_rna`` /
    ``lib_atac`` to ``obs`` in place. Raises ValueError if a cell has counts of a modality its mask
    says was not measured (the detection rates would count it)."""
    det, n_measured = {}, {}
    for name, x, mask in ((keys.RNA, rna, obs["mask_rna"].values), (keys.ATAC, atac, obs["mask_atac"].values)):
        row_nnz = np.diff(x.indptr)
        if np.any(row_nnz[~mask] > 0):
            bad = obs.index[np.flatnonzero((row_nnz > 0) & ~mask)[0]]
            raise ValueError(f"cell {bad!r} has {name} counts but mask_{name} is False")
        # Detection counts only over cells where the modality was measured (rows of others are empty).
        det[name] = detection_counts(x, x.shape[1])
        n_measured[name] = int(mask.sum())
    lib = np.asarray(rna.sum(axis=1)).ravel().astype(np.int64)
    obs["lib_rna"] = lib
    obs["lib_atac"] = np.asarray(atac.sum(axis=1)).ravel().astype(np.int64)
    m = obs["mask_rna"].values
    codes = obs[batch_key].cat.codes.values[m]
    loglib = np.log(np.maximum(lib[m], 1).astype(np.float64))
    return BlockStats(det, n_measured, np.bincount(codes, loglib, minlength=n_batches),
                      np.bincount(codes, loglib ** 2, minlength=n_batches),
                      np.bincount(codes, minlength=n_batches).astype(np.int64))
