"""The paired input of the harness: both modalities of the same cells, in memory (small data sets).

``read_pair`` reads an RNA and an ATAC ``.h5ad`` of the same cells (matched by obs name, in the RNA
file's order); ``synthetic_pair`` draws a fully paired synthetic atlas with mva-synth (cell types and
batches known). The harness then hides modalities itself (``scenario``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class PairedData:
    name: str
    rna: sp.csr_matrix  # (n, G) integer counts
    atac: sp.csr_matrix  # (n, R) integer counts
    cell_ids: np.ndarray  # (n,) str, unique
    batch: np.ndarray  # (n,) str batch label per cell
    labels: np.ndarray | None  # (n,) str cell type, None when the data set has no labels
    gene_names: list[str]
    region_names: list[str]

    @property
    def n_cells(self) -> int:
        return self.rna.shape[0]

    def __post_init__(self) -> None:
        n = self.rna.shape[0]
        if self.atac.shape[0] != n or len(self.cell_ids) != n or len(self.batch) != n:
            raise ValueError(f"{self.name}: RNA has {n} cells, ATAC {self.atac.shape[0]}, ids {len(self.cell_ids)}, "
                             f"batches {len(self.batch)}: they must be the same cells")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {n} cells")
        if len(set(self.cell_ids)) != n:
            raise ValueError(f"{self.name}: cell ids are not unique")


def _counts(x, where: str) -> sp.csr_matrix:
    x = sp.csr_matrix(x)
    if x.nnz and (x.data.min() < 0 or not np.all(np.equal(np.mod(x.data, 1), 0))):
        raise ValueError(f"{where}: X must hold raw non-negative integer counts")
    return x.astype(np.int32)


def read_pair(rna_path: str | Path, atac_path: str | Path, batch_key: str | None = None,
              label_key: str | None = None) -> PairedData:
    """Paired cells of two .h5ad files; cells only in one file are an error (the harness needs truth)."""
    import anndata as ad

    r, a = ad.read_h5ad(rna_path), ad.read_h5ad(atac_path)
    r.obs_names, a.obs_names = r.obs_names.astype(str), a.obs_names.astype(str)
    missing = r.obs_names[~r.obs_names.isin(a.obs_names)]
    if len(missing) or len(r.obs_names) != len(a.obs_names):
        raise ValueError(f"{rna_path} and {atac_path} must hold the same cells (paired data); "
                         f"{len(missing)} RNA cells are not in the ATAC file, e.g. {list(missing[:3])}")
    a = a[r.obs_names]
    if batch_key is None:
        batch = np.full(r.n_obs, "batch_0", dtype=object)
    elif batch_key not in r.obs.columns:
        raise ValueError(f"{rna_path}: no obs column {batch_key!r} (--batch-key); columns: {list(r.obs.columns)}")
    else:
        batch = r.obs[batch_key].astype(str).to_numpy()
    labels = None
    if label_key is not None:
        if label_key not in r.obs.columns:
            raise ValueError(f"{rna_path}: no obs column {label_key!r} (--label-key); columns: {list(r.obs.columns)}")
        labels = r.obs[label_key].astype(str).to_numpy()
    return PairedData(name=Path(rna_path).parent.name, rna=_counts(r.X, str(rna_path)),
                      atac=_counts(a.X, str(atac_path)), cell_ids=r.obs_names.to_numpy(dtype=str),
                      batch=batch, labels=labels, gene_names=list(r.var_names.astype(str)),
                      region_names=list(a.var_names.astype(str)))


def synthetic_pair(work_dir: str | Path, n_cells: int = 1000, n_genes: int = 300, n_regions: int = 600,
                   seed: int = 0) -> PairedData:
    """A fully paired mva-synth atlas (2 batches, 6 cell types), read back from the store it writes."""
    from data.store import open_store
    from data.synthetic import write_synthetic_store

    path = Path(work_dir) / f"synthetic_paired_{n_cells}_{n_genes}_{n_regions}_{seed}.zarr"
    if not (path / "zarr.json").is_file():
        write_synthetic_store(path, n_cells=n_cells, n_genes=n_genes, n_regions=n_regions, seed=seed,
                              paired_fraction=1.0, rna_only_fraction=0.0, atac_only_fraction=0.0,
                              progress=False, overwrite=True)
    rna, atac, obs = read_store(path)
    meta = open_store(path).meta
    return PairedData(name="synthetic", rna=rna, atac=atac, cell_ids=obs.index.to_numpy(dtype=str),
                      batch=obs["batch"].astype(str).to_numpy(), labels=obs["cell_type"].astype(str).to_numpy(),
                      gene_names=list(meta.gene_names), region_names=list(meta.region_names))


def read_store(path: str | Path) -> tuple[sp.csr_matrix, sp.csr_matrix, pd.DataFrame]:
    """Every cell of a (small) store: RNA and ATAC counts as int32 CSR and the obs table, store order."""
    from data.store import open_store

    st = open_store(path)
    off = st.meta.shard_offsets
    mats = [sp.vstack([st.read_rows(m, s, 0, off[s + 1] - off[s]) for s in range(st.meta.n_shards)]).tocsr()
            for m in ("rna", "atac")]
    return mats[0].astype(np.int32), mats[1].astype(np.int32), st.read_obs()
