"""Align the features of several inputs by name, and remap count blocks onto the aligned columns.

Rule (documented in docs/store.md): per modality, only inputs that measure it take part.
``intersection`` keeps the features every such input has, in the first input's order; ``union`` keeps
all of them (first input's order, then new names in order of appearance) and leaves zeros where an
input lacks a feature. A ``target`` (``mva-build features_from``: a trained model's features) replaces both:
exactly its names in its order, zeros where an input lacks one. What is dropped or padded is reported, never
silent.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data.validate import ValidationError, check_overlap, check_unique


@dataclass
class Alignment:
    names: dict[str, pd.Index]  # modality -> aligned feature names
    var: dict[str, pd.DataFrame]  # modality -> feature table (first input having a value provides it)
    colmaps: list[dict[str, np.ndarray | None]]  # per input: input column -> aligned column (-1 = dropped)
    dropped: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # modality -> input -> names
    # features_from: modality -> input measuring it -> target names that input lacks (zero columns for its cells)
    padded: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def restrict(self, modality: str, keep: np.ndarray) -> None:
        """Keep only aligned features ``keep`` (bool) of a modality, e.g. after a detection filter."""
        new_pos = np.cumsum(keep) - 1
        new_pos[~keep] = -1
        self.names[modality] = self.names[modality][keep]
        self.var[modality] = self.var[modality].iloc[np.flatnonzero(keep)]
        for cm in self.colmaps:
            if cm[modality] is not None:
                old = cm[modality]
                cm[modality] = np.where(old >= 0, new_pos[np.maximum(old, 0)], -1)


def align(features: list[dict[str, pd.DataFrame | None]], where: list[str], join: str,
          measured: list[dict[str, bool]] | None = None, target: dict[str, pd.Index] | None = None) -> Alignment:
    """``measured[i][mod]``: whether any cell of input ``i`` measures ``mod`` (default: every input with features
    of it). An input none of whose cells measures a modality (an h5ad_pair whose ATAC file has 0 cells) has no
    counts there, so it does not vote on that modality's features: under intersection its feature list only
    removed features the other inputs measured, under union it only added columns no cell measured. Its
    column map is still made, so its (empty) rows go through the same checks. ``target[mod]``: the names to
    write (``join`` is then not used); every input measuring ``mod`` must share at least one of them."""
    if join not in ("intersection", "union"):
        raise ValidationError(f"feature_join must be 'intersection' or 'union', got {join!r}")
    names, var, dropped, padded = {}, {}, {}, {}
    colmaps: list[dict[str, np.ndarray | None]] = [{} for _ in features]
    for mod in ("rna", "atac"):
        with_features = [i for i, f in enumerate(features) if f[mod] is not None and len(f[mod])]
        have = [i for i in with_features if measured is None or measured[i][mod]]
        for i in have:
            check_unique(features[i][mod].index, where[i], f"{mod} feature name")
        idx = [features[i][mod].index for i in have]
        if target is None:
            check_overlap(idx, [where[i] for i in have], mod)
            names[mod] = _joined(idx, join)
        else:
            for i, ix in zip(have, idx):
                if not ix.isin(target[mod]).any():
                    raise ValidationError(f"{where[i]}: none of its {len(ix)} {mod} features is among the "
                                          f"{len(target[mod])} of features_from (e.g. {list(ix[:2])} vs "
                                          f"{list(target[mod][:2])}); same naming scheme?")
            names[mod] = pd.Index(target[mod], dtype=str)
            padded[mod] = {where[i]: [str(n) for n in names[mod][~names[mod].isin(ix)]] for i, ix in zip(have, idx)}
        if not have:
            var[mod] = pd.DataFrame(index=names[mod])
        else:
            # Feature table: the first input that has the feature provides its columns; later inputs fill
            # what it lacks (a column only they have, a gene without an id), never overwrite a value.
            parts = [features[i][mod] for i in have]
            table = pd.concat([p.loc[p.index.isin(names[mod])] for p in parts])
            table = table[~table.index.duplicated()].reindex(names[mod])
            for p in parts[1:]:
                _fill_gaps(table, p)
            _restore_integers(table, parts)
            _restore_booleans(table, parts)
            # a column with some missing values (a gene without an id, a column only some inputs have under
            # feature_join=union) is kept, its gaps missing; only a column with no value at all is dropped
            var[mod] = table[[c for c in table.columns if table[c].notna().any()]]
            dropped[mod] = {where[i]: [str(n) for n in features[i][mod].index[~features[i][mod].index.isin(names[mod])]]
                            for i in have}
        for i, f in enumerate(features):
            colmaps[i][mod] = names[mod].get_indexer(f[mod].index) if i in with_features else None
    return Alignment(names, var, colmaps, dropped, padded)


def _joined(idx: list[pd.Index], join: str) -> pd.Index:
    """The inputs' names under ``join``, in the first input's order (union: then new ones as they appear)."""
    if not idx:
        return pd.Index([], dtype=str)
    keep = idx[0]
    if join == "intersection":
        common = keep
        for ix in idx[1:]:
            common = common.intersection(ix, sort=False)
        keep = keep[keep.isin(common)]
    else:
        for ix in idx[1:]:
            keep = keep.append(ix[~ix.isin(keep)])
    return pd.Index(keep, dtype=str)


def _fill_gaps(table: pd.DataFrame, other: pd.DataFrame) -> None:
    """Fill ``table``'s missing values from ``other`` (same column, same feature name), in place."""
    other = other.reindex(table.index)
    for col in table.columns.intersection(other.columns):
        miss = table[col].isna().to_numpy() & other[col].notna().to_numpy()
        if miss.any():
            before = table[col]
            vals = before.astype(object).to_numpy()
            vals[miss] = other[col].astype(object).to_numpy()[miss]
            # back from object (a float column filled completely is written as floats, not as text), then to the
            # column's own dtype (Int64, boolean, category) where it had one: a column that had no value here took
            # its dtype from pd.concat (float64 of NaN), which bools or text must not be cast to
            filled = pd.Series(vals, index=table.index).infer_objects()
            if before.notna().any():
                with contextlib.suppress(TypeError, ValueError):
                    filled = filled.astype("category" if isinstance(before.dtype, pd.CategoricalDtype) else before.dtype)
            table[col] = filled


def _restore_integers(table: pd.DataFrame, parts: list[pd.DataFrame]) -> None:
    """Give back the integer dtype that reindexing took (a feature only some inputs have, under
    feature_join=union, made an int column float64: counts like 3 read back as 3.0): int64 where every
    gap was filled, else pandas' nullable Int64 (anndata writes it with a mask; missing stays missing)."""
    for col in table.columns:
        dtypes = [p[col].dtype for p in parts if col in p.columns]
        if table[col].dtype.kind != "f" or not all(pd.api.types.is_integer_dtype(d) for d in dtypes):
            continue
        with contextlib.suppress(TypeError, ValueError, OverflowError):  # e.g. uint64 past 2**63: left float
            table[col] = table[col].astype("Int64" if table[col].isna().any() else np.int64)


def _restore_booleans(table: pd.DataFrame, parts: list[pd.DataFrame]) -> None:
    """Give back the bool dtype that ``pd.concat`` took when an input lacked the column (scanpy's
    ``highly_variable`` in one input only): the object column of True/False was written as the text
    "True"/"False", which ``astype(bool)`` reads as True everywhere. bool where every value is there, else
    pandas' nullable ``boolean``."""
    for col in table.columns:
        dtypes = [p[col].dtype for p in parts if col in p.columns]
        if pd.api.types.is_bool_dtype(table[col].dtype) or not all(pd.api.types.is_bool_dtype(d) for d in dtypes):
            continue
        table[col] = table[col].astype("boolean" if table[col].isna().any() else bool)


def summed_duplicates(x: sp.csr_matrix) -> sp.csr_matrix:
    """``x`` in canonical form (sorted, one entry per (row, column): scipy's meaning of duplicates is their sum),
    summed in a wide type: two int16 entries of 30,000 wrapped to -5,536 (counts are checked entry by entry,
    before this sum). ``x`` itself is left as it is."""
    if x.has_canonical_format:
        return x
    wide = np.float64 if x.dtype.kind == "f" else np.uint64 if x.dtype.kind in "ub" else np.int64
    x = x.astype(wide)  # a copy
    x.sum_duplicates()
    return x


def remap_columns(x: sp.csr_matrix, colmap: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """Move columns of ``x`` to ``colmap[col]`` in an ``n_cols``-wide matrix, dropping ``colmap == -1``,
    stored zeros (detection, the mask check and the stores' nnz count stored entries) and duplicate
    entries (summed first, as scipy's canonical form)."""
    x = summed_duplicates(x)
    new = colmap[x.indices]
    keep = (new >= 0) & (x.data != 0)
    row_of = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    counts = np.bincount(row_of[keep], minlength=x.shape[0])
    out = sp.csr_matrix((x.data[keep], new[keep], np.concatenate([[0], np.cumsum(counts)])),
                        shape=(x.shape[0], n_cols))
    out.sort_indices()
    return out
