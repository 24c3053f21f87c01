"""Deterministic train / validation split by cell id.

The split must not move when the store is re-sharded, re-shuffled or read by a different number of
ranks, so it depends on nothing but the cell id: a 64-bit hash of the id, compared to a threshold.
The store keeps the hash per cell (``split_hash``) so the loader never re-hashes strings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

_SCALE = float(2**64)


def cell_hash(cell_ids: Iterable[str]) -> np.ndarray:
    """uint64 hash of each cell id (blake2b, stable across Python versions and platforms)."""
    out = [int.from_bytes(hashlib.blake2b(str(c).encode("utf-8"), digest_size=8).digest(), "little")
           for c in cell_ids]
    return np.asarray(out, dtype=np.uint64)


def is_validation(hashes: np.ndarray, val_fraction: float) -> np.ndarray:
    """Boolean mask of validation cells: the hash, read as a number in [0, 1), is below the fraction."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return (np.asarray(hashes, dtype=np.uint64).astype(np.float64) / _SCALE) < val_fraction
