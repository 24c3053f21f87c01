"""Build the minibatch dict of ``data/keys.py`` from gathered CSR rows, and move it to a device.

Counts stay sparse (``torch.sparse_csr_tensor``) on the CPU side: a 1,024 x 10,000-peak batch at 4 %
density is ~3 MB sparse versus 41 MB dense, and the model's first layers multiply sparse x dense. Only
:func:`to_device` densifies, and only when asked, after the copy (so the host never holds dense counts).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from data import keys
from data.cell_table import CellTable
from data.reader import Block

# Sparse CSR is the contract (docs/architecture.md); torch's "beta" notice on every batch is noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def csr_tensor(block: Block, n_cols: int, *, dense: bool = False) -> torch.Tensor:
    """float32 CSR tensor of ``block`` without copies (int32 or int64 indices, as gathered); dense if asked.

    torch's CSR kernels (``sparse.mm``, transposes, ``crow_indices`` arithmetic) take int32 indices, which
    halve the index bytes of every batch; ``indptr`` and ``indices`` only need to share one dtype."""
    n_rows = len(block.indptr) - 1
    itype = np.int64 if block.indices.dtype == np.int64 or block.indptr.dtype == np.int64 else np.int32
    t = torch.sparse_csr_tensor(torch.from_numpy(np.ascontiguousarray(block.indptr, dtype=itype)),
                                torch.from_numpy(np.ascontiguousarray(block.indices, dtype=itype)),
                                torch.from_numpy(np.ascontiguousarray(block.data, dtype=np.float32)),
                                size=(n_rows, n_cols), check_invariants=False)
    return t.to_dense() if dense else t


def collate(cells: np.ndarray, blocks: dict[str, Block], table: CellTable, n_features: dict[str, int], *,
            dense: bool = False, size_factor: bool = False) -> dict[str, torch.Tensor]:
    """Minibatch dict for the global rows ``cells`` (the rows of ``blocks``, same order).

    A modality missing from ``blocks`` (not read) becomes an empty sparse matrix with mask False, so the
    dict always has the full contract.
    """
    cells = np.asarray(cells, dtype=np.int64)
    n = len(cells)
    out: dict[str, torch.Tensor] = {}
    mask = table.mask[cells].copy()
    for m in keys.MODALITIES:
        if m in blocks:
            out[m] = csr_tensor(blocks[m], n_features[m], dense=dense)
        else:
            empty = Block(np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(n + 1, np.int32))
            out[m] = csr_tensor(empty, n_features[m], dense=dense)
            mask[:, keys.MASK_COLUMN[m]] = False
    out[keys.MASK] = torch.from_numpy(mask)
    out[keys.BATCH] = torch.from_numpy(table.batch[cells].astype(np.int64))
    out[keys.CAT_COVS] = torch.from_numpy(table.cat_covs[cells].astype(np.int64))
    out[keys.CONT_COVS] = torch.from_numpy(table.cont_covs[cells])
    out[keys.INDEX] = torch.from_numpy(cells.copy())
    if table.label is not None:
        out[keys.LABEL] = torch.from_numpy(table.label[cells].astype(np.int64))
    if size_factor:
        out[keys.SIZE_FACTOR] = torch.from_numpy(_size_factors(table, cells, mask))
    return out


def _size_factors(table, cells: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, 2) float32 [RNA, ATAC] size factors for ``use_size_factor`` models.

    RNA: the total count (the model takes its log). ATAC: the model multiplies the accessibility
    probability by this factor directly (spec 2.5), so it must lie in (0, 1]: the cell's total count
    over the largest total of the store (``CellTable.atac_library_max``; the same on every rank). An
    unmeasured modality gets 1 (logs stay finite; its loss is masked anyway).
    """
    return size_factor_rows(table.library[cells], mask, table.atac_library_max)


def size_factor_rows(totals: np.ndarray, mask: np.ndarray, atac_library_max: float) -> np.ndarray:
    """(n, 2) size factors from (n, 2) [RNA, ATAC] row totals: the one formula of every input path (the
    store loader above, the notebook API's in-memory data, the MuData handed to scvi-tools)."""
    sf = np.stack([np.maximum(totals[:, 0], 1.0), np.clip(totals[:, 1] / atac_library_max, 1e-6, 1.0)], axis=1)
    return np.where(mask, sf, 1.0).astype(np.float32)


def atac_library_max(atac_totals: np.ndarray, measured: np.ndarray) -> float:
    """The largest ATAC total of the measured cells, at least 1 (as ``CellTable.atac_library_max``)."""
    top = atac_totals[measured]
    return max(1.0, float(top.max())) if top.size else 1.0


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str, dense: bool = False,
              non_blocking: bool = True) -> dict[str, torch.Tensor]:
    """Copy every tensor to ``device``; counts stay sparse unless ``dense`` (densified on the device)."""
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=non_blocking)
        if dense and v.layout == torch.sparse_csr:
            v = v.to_dense()
        out[k] = v
    return out
