"""Optional feature filters by detection fraction, computed out of core with Dask.

Each input block becomes one delayed task returning per-feature detection counts in the aligned
feature space; the counts are summed in a tree, so only a few count vectors are alive at once whatever
the number of blocks. :func:`apply_filters` holds the rule; *where* the block tasks run is its ``count``
argument: by default here, with Dask's synchronous scheduler (h5py handles are not thread-safe; the
point is bounded memory, not parallel reads); mva-build's Dask path (data/dask_build.py) passes a
``count`` that runs them on its workers.
"""

from __future__ import annotations

from collections.abc import Callable

import dask
import numpy as np
import scipy.sparse as sp

from data import keys
from data.convert.align import Alignment, remap_columns
from data.store_stats import detection_counts
from data.validate import ValidationError

# (input index, first row, stop row, its column map, the rows kept: a bool mask, or None = all of them)
Block = tuple[int, int, int, np.ndarray, np.ndarray | None]
# (modality, blocks, n_cols) -> per-feature detection counts summed over the blocks
Count = Callable[[str, list[Block], int], np.ndarray]


def block_detection(rows: tuple, modality: str, colmap: np.ndarray, n_cols: int,
                    keep: np.ndarray | None = None) -> np.ndarray:
    """Detection counts of one block ``rows = (rna, atac)`` of an input, in the aligned feature space, over
    its rows ``keep`` (None = all)."""
    x = rows[0] if modality == keys.RNA else rows[1]
    if x is None:
        return np.zeros(n_cols, np.int64)
    x = sp.csr_matrix(x)
    return detection_counts(remap_columns(x if keep is None else x[keep], colmap, n_cols), n_cols)


def _sum(*parts: np.ndarray) -> np.ndarray:
    return np.sum(parts, axis=0)


def tree_sum(parts: list, split_every: int = 8):
    """Sum delayed arrays in a tree: only a few count vectors are alive at once, whatever the blocks."""
    while len(parts) > 1:
        parts = [dask.delayed(_sum, pure=True)(*parts[i:i + split_every]) for i in range(0, len(parts), split_every)]
    return parts[0]


def _source_block(source, start: int, stop: int, modality: str, colmap: np.ndarray, n_cols: int,
                  keep: np.ndarray | None) -> np.ndarray:
    return block_detection(source._rows(start, stop), modality, colmap, n_cols, keep)


def count_in_process(sources) -> Count:
    """Block tasks over the opened ``sources``, run here by the synchronous scheduler."""
    def count(modality: str, blocks: list[Block], n_cols: int) -> np.ndarray:
        parts = [dask.delayed(_source_block)(sources[i], start, stop, modality, cm, n_cols, keep)
                 for i, start, stop, cm, keep in blocks]
        return dask.compute(tree_sum(parts), scheduler="synchronous")[0]
    return count


def detection_fraction(sources, keeps, alignment: Alignment, modality: str, block_size: int,
                       count: Count | None = None) -> np.ndarray:
    """Fraction of cells measured in ``modality`` (over all inputs) with a nonzero count, per feature.

    ``keeps``: per source, the boolean keep-mask over its cells (dropped cells do not count).
    """
    n_cols = len(alignment.names[modality])
    blocks, n_measured = [], 0
    for i, (src, keep, cm) in enumerate(zip(sources, keeps, alignment.colmaps)):
        if cm[modality] is None:
            continue
        n_measured += int((src.obs[f"mask_{modality}"].to_numpy(bool) & keep).sum())
        # Dropped cells (no modality at all) are not written, and their rows are not checked to be empty:
        # they must not count as detections either (the denominator above leaves them out too).
        for start in range(0, len(src.obs), block_size):
            stop = min(start + block_size, len(src.obs))
            blocks.append((i, start, stop, cm[modality], None if keep[start:stop].all() else keep[start:stop]))
    if not blocks or n_measured == 0:
        return np.zeros(n_cols)
    return (count or count_in_process(sources))(modality, blocks, n_cols) / n_measured


def apply_filters(sources, keeps, alignment: Alignment, min_fraction: dict[str, float], block_size: int,
                  count: Count | None = None) -> dict[str, list[str]]:
    """Restrict ``alignment`` in place to features detected in >= min_fraction; return what was removed."""
    removed = {}
    for mod, frac in min_fraction.items():
        if frac <= 0 or len(alignment.names[mod]) == 0:
            continue
        det = detection_fraction(sources, keeps, alignment, mod, block_size, count)
        keep = det >= frac
        removed[mod] = [str(n) for n in alignment.names[mod][~keep]]
        if not keep.any():
            raise ValidationError(f"filter min_{'gene' if mod == 'rna' else 'region'}_fraction={frac} removes every "
                                  f"{mod} feature (max detection fraction {det.max():.4f})")
        alignment.restrict(mod, keep)
    return removed
