"""Optional feature filters by detection fraction, computed out of core with Dask.

Each input block becomes one delayed task returning per-feature detection counts in the aligned
feature space; Dask sums them with a tree reduction, so only a few count vectors are alive at once
whatever the number of blocks. The synchronous scheduler is used because h5py handles are not
thread-safe; the point here is bounded memory, not parallel reads.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from data.convert.align import Alignment, remap_columns


def _block_detection(source, start, stop, modality, colmap, n_cols):
    rna, atac = source._rows(start, stop)
    x = rna if modality == "rna" else atac
    if x is None:
        return np.zeros((1, n_cols), np.int64)
    x = remap_columns(x, colmap, n_cols)
    return np.bincount(x.indices[x.data > 0], minlength=n_cols).astype(np.int64)[None, :]


def detection_fraction(sources, keeps, alignment: Alignment, modality: str, block_size: int) -> np.ndarray:
    """Fraction of cells measured in ``modality`` (over all inputs) with a nonzero count, per feature.

    ``keeps``: per source, the boolean keep-mask over its cells (dropped cells do not count).
    """
    n_cols = len(alignment.names[modality])
    pieces, n_measured = [], 0
    for src, keep, cm in zip(sources, keeps, alignment.colmaps):
        if cm[modality] is None:
            continue
        n_measured += int((src.obs[f"mask_{modality}"].to_numpy(bool) & keep).sum())
        for start in range(0, len(src.obs), block_size):
            stop = min(start + block_size, len(src.obs))
            # Dropped cells (no modality at all) carry no counts, so whole blocks can be counted.
            d = dask.delayed(_block_detection)(src, start, stop, modality, cm[modality], n_cols)
            pieces.append(da.from_delayed(d, shape=(1, n_cols), dtype=np.int64))
    if not pieces or n_measured == 0:
        return np.zeros(n_cols)
    total = da.concatenate(pieces, axis=0).sum(axis=0, split_every=8)
    counts = total.compute(scheduler="synchronous")
    return counts / n_measured


def apply_filters(sources, keeps, alignment: Alignment, min_fraction: dict[str, float], block_size: int
                  ) -> dict[str, list[str]]:
    """Restrict ``alignment`` in place to features detected in >= min_fraction; return what was removed."""
    removed = {}
    for mod, frac in min_fraction.items():
        if frac <= 0 or len(alignment.names[mod]) == 0:
            continue
        det = detection_fraction(sources, keeps, alignment, mod, block_size)
        keep = det >= frac
        removed[mod] = [str(n) for n in alignment.names[mod][~keep]]
        if not keep.any():
            raise ValueError(f"filter min_{'gene' if mod == 'rna' else 'region'}_fraction={frac} removes every "
                             f"{mod} feature (max detection fraction {det.max():.4f})")
        alignment.restrict(mod, keep)
    return removed
