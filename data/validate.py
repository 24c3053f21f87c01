"""Input validation for mva-build: every error names the file, the field and an example row.

The converters call these on each block as it streams by, so a bad value deep in a large file is
reported with the cell id and feature name where it was found, before anything is renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

MAX_COUNT = 2**32 - 1  # the widest count dtype of a store is uint32 (data/store_format.py)


class ValidationError(ValueError):
    """Bad input; the message says where (file, field, example row) and what is wrong."""


def check_output(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing output before any work is done; overwrite replaces only a store."""
    from data.writer import is_store_dir

    if Path(out).exists() and not overwrite:
        raise ValidationError(f"output {out} already exists; set overwrite=true to replace it")
    if Path(out).exists() and not is_store_dir(Path(out)):
        raise ValidationError(f"output {out} exists and is not a multivi-atlas store: overwrite=true only "
                              "replaces a store; remove it yourself or choose another output")


def check_counts(x: sp.csr_matrix, where: str, modality: str, cell_ids: pd.Index,
                 feature_names: pd.Index) -> None:
    """Counts must be finite, non-negative integers."""
    d = x.data
    problems = []
    if d.dtype.kind == "f":
        problems.append((~np.isfinite(d), "is NaN or infinite"))
        with np.errstate(invalid="ignore"):
            problems.append((np.isfinite(d) & (d != np.floor(d)), "is not an integer"))
    elif d.dtype.kind not in "iub":
        raise ValidationError(f"{where}: {modality} counts have dtype {d.dtype}; expected integer counts")
    if d.dtype.kind in "if":
        with np.errstate(invalid="ignore"):
            problems.append((d < 0, "is negative"))
    if d.dtype.kind == "f" or d.dtype.itemsize > 4:  # narrower integers cannot exceed it
        # the store holds counts as uint8/16/32 (docs/store.md); a count past 2^32 - 1 is no read count (a scaled
        # or summed matrix), and was stored as uint64, or failed after the whole pass naming no cell
        with np.errstate(invalid="ignore"):
            # compared in float64: numpy casts MAX_COUNT to float32 for a float32 array, where it rounds to 2^32
            big = (d.astype(np.float64, copy=False) if d.dtype.kind == "f" else d) > MAX_COUNT
            problems.append((big, f"is above {MAX_COUNT:,}, the largest count a store holds"))
    for bad, what in problems:
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(x.indptr, k, side="right") - 1)
            raise ValidationError(
                # the cell id, not a row number: callers check blocks and shards, whose rows are not the file's
                f"{where}: {modality} count of cell {cell_ids[row]!r}, feature "
                f"{feature_names[x.indices[k]]!r}: value {d[k].item()!r} {what} "
                f"({int(bad.sum())} such values in this block); counts must be non-negative integers"
                + ("" if what != "is not an integer" else
                   " (normalised values? if the raw counts are in a layer, set the input's layer=<name>)"))


def check_unmeasured_empty(x: sp.csr_matrix, measured: np.ndarray, where: str, modality: str,
                           cell_ids: pd.Index) -> None:
    """A cell whose mask says ``modality`` was not measured must have no counts in it (checked as blocks are
    read, so the error names the input, and comes before a preshuffle has spilled every cell to disk)."""
    bad = (np.diff(x.indptr) > 0) & ~np.asarray(measured, bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValidationError(f"{where}: cell {cell_ids[row]!r} has {modality} counts but its mask says {modality} "
                              f"was not measured ({int(bad.sum())} such cells in this block); fix obs mask_{modality} / "
                              "modality, or the counts")


def check_unique(index: pd.Index, where: str, what: str) -> None:
    if not index.is_unique:
        dup = index[index.duplicated()]
        raise ValidationError(f"{where}: duplicate {what} {dup[0]!r} (at positions "
                              f"{list(np.flatnonzero(index == dup[0])[:5])}; {len(dup)} duplicates in total)")


def input_columns(obs: pd.DataFrame) -> list[str]:
    """An input's obs columns as a message lists them: the first 20, without the per-modality masks that
    the reader adds to every input (they were listed as if the file had them)."""
    return [c for c in obs.columns if c not in ("mask_rna", "mask_atac")][:20]


def check_columns(obs: pd.DataFrame, columns: dict[str, str], where: str) -> None:
    """``columns`` maps column name -> role (e.g. 'batch_key'); each must exist and have no missing value."""
    for col, role in columns.items():
        if col not in obs.columns:
            raise ValidationError(f"{where}: obs has no column {col!r} ({role}); available columns: "
                                  f"{input_columns(obs)}")
        miss = obs[col].isna().to_numpy()
        if miss.any():
            raise ValidationError(f"{where}: obs column {col!r} ({role}) is missing for cell "
                                  f"{obs.index[np.flatnonzero(miss)[0]]!r} ({int(miss.sum())} cells)")


def check_cont(obs: pd.DataFrame, columns: list[str], where: str) -> None:
    for col in columns:
        try:
            v = obs[col].to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{where}: continuous covariate {col!r} is not numeric ({exc})") from None
        bad = ~np.isfinite(v)
        if bad.any():
            raise ValidationError(f"{where}: continuous covariate {col!r} is {v[bad][0]} for cell "
                                  f"{obs.index[np.flatnonzero(bad)[0]]!r}")
        # the store keeps them as float32: a finite 1e39 was written as inf (the model's input NaN from then on)
        big = np.abs(v) > np.finfo(np.float32).max
        if big.any():
            raise ValidationError(f"{where}: continuous covariate {col!r} is {v[big][0]} for cell "
                                  f"{obs.index[np.flatnonzero(big)[0]]!r}, beyond float32 (the store's type); "
                                  "rescale it")


def check_not_empty(n_cells: int, n_features: dict[str, int], where: str) -> None:
    if n_cells == 0:
        raise ValidationError(f"{where}: input has no cells")
    if all(v == 0 for v in n_features.values()):
        raise ValidationError(f"{where}: input has no features (no genes and no peaks)")


def cells_without_modality(obs: pd.DataFrame, where: str, drop: bool) -> np.ndarray:
    """Boolean keep-mask. A cell with neither modality is an error unless ``drop`` is set."""
    none = ~(obs["mask_rna"].to_numpy(bool) | obs["mask_atac"].to_numpy(bool))
    if none.any() and not drop:
        raise ValidationError(f"{where}: cell {obs.index[np.flatnonzero(none)[0]]!r} has neither RNA nor ATAC "
                              f"({int(none.sum())} such cells); set drop_empty_cells=true to drop them")
    return ~none


def check_overlap(names: list[pd.Index], where: list[str], modality: str) -> None:
    if len(names) < 2:
        return
    common = names[0]
    for n in names[1:]:
        common = common.intersection(n)
    if len(common) == 0:
        ex = ", ".join(f"{w}: {list(n[:2])}" for w, n in zip(where, names))
        raise ValidationError(f"{modality} feature names of the inputs do not overlap at all ({ex}); "
                              "are they in the same naming scheme (e.g. gene symbols vs ids, chr:s-e vs chr-s-e)?")
