"""The unpaired scenario of the MultiVI paper, as a pure function of (number of cells, fraction, seed).

A fraction of the paired cells stays paired; the rest is split in two halves that lose one modality
each (RNA-only cells lose their ATAC, ATAC-only cells lose their RNA). The hidden counts are kept
aside as ground truth for imputation and for the cross-modality latent distance; ``training_view``
returns the matrices the models are allowed to see, where a hidden modality is an EMPTY row (which is
also how the reference infers a missing modality, from a zero row sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

PAIRED, RNA_ONLY, ATAC_ONLY = "paired", "rna_only", "atac_only"


@dataclass(frozen=True)
class Scenario:
    fraction: float
    seed: int
    paired: np.ndarray  # cell positions (sorted) that keep both modalities
    rna_only: np.ndarray  # cells whose ATAC is hidden
    atac_only: np.ndarray  # cells whose RNA is hidden

    @property
    def n_cells(self) -> int:
        return len(self.paired) + len(self.rna_only) + len(self.atac_only)

    @property
    def mask(self) -> np.ndarray:
        """(n, 2) bool: [RNA visible, ATAC visible] per cell."""
        m = np.ones((self.n_cells, 2), dtype=bool)
        m[self.atac_only, 0] = False
        m[self.rna_only, 1] = False
        return m

    @property
    def modality(self) -> np.ndarray:
        """Per-cell group name (paired / rna_only / atac_only), e.g. for modality mixing."""
        out = np.full(self.n_cells, PAIRED, dtype=object)
        out[self.rna_only], out[self.atac_only] = RNA_ONLY, ATAC_ONLY
        return out


def make_scenario(n_cells: int, fraction: float, seed: int) -> Scenario:
    """Seeded split: round(fraction * n) paired cells, the rest halved into RNA-only and ATAC-only.

    The permutation depends only on (n_cells, seed), and the paired set for a smaller fraction is a
    subset of the paired set for a larger one, so a fraction sweep removes pairing cell by cell.
    """
    if n_cells < 1:
        raise ValueError(f"need at least one cell, got n_cells={n_cells}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"paired fraction must be in [0, 1], got {fraction}")
    perm = np.random.default_rng([seed, 6]).permutation(n_cells)
    n_paired = round(fraction * n_cells)
    rest = perm[n_paired:]
    half = len(rest) // 2
    return Scenario(fraction=float(fraction), seed=int(seed), paired=np.sort(perm[:n_paired]),
                    rna_only=np.sort(rest[:half]), atac_only=np.sort(rest[half:]))


def _drop_rows(x: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """Copy of ``x`` whose rows ``rows`` are empty (no stored entries at all, not explicit zeros)."""
    x = sp.csr_matrix(x)
    keep = np.ones(x.shape[0], dtype=bool)
    keep[rows] = False
    nnz = np.where(keep, np.diff(x.indptr), 0)
    take = np.repeat(keep, np.diff(x.indptr))
    return sp.csr_matrix((x.data[take].copy(), x.indices[take].copy(), np.concatenate([[0], np.cumsum(nnz)])),
                         shape=x.shape)


def training_view(sc: Scenario, rna: sp.csr_matrix, atac: sp.csr_matrix) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(RNA, ATAC) the models may see: hidden rows emptied. The only way counts reach training."""
    if rna.shape[0] != sc.n_cells or atac.shape[0] != sc.n_cells:
        raise ValueError(f"scenario has {sc.n_cells} cells but RNA has {rna.shape[0]} and ATAC {atac.shape[0]}")
    r, a = _drop_rows(rna, sc.atac_only), _drop_rows(atac, sc.rna_only)
    r.eliminate_zeros()
    a.eliminate_zeros()
    return r, a


def hidden_truth(sc: Scenario, rna: sp.csr_matrix, atac: sp.csr_matrix) -> dict[str, sp.csr_matrix]:
    """The counts kept aside: RNA of the ATAC-only cells, ATAC of the RNA-only cells (scenario order)."""
    return {"rna": sp.csr_matrix(rna)[sc.atac_only], "atac": sp.csr_matrix(atac)[sc.rna_only]}
