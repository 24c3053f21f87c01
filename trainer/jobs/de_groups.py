"""de / da cell groups: the cell sets and comparisons from the de options, and the raw statistics.

``cell_sets`` turns ``de.groupby`` / ``de.group1`` / ``de.group2`` or the explicit cell-id files into
sorted row indices and the list of comparisons (one-vs-rest or against group2). ``raw_sums`` is the
one pass over ALL cells of the store that accumulates per-set sums (sets x features) for the raw
columns; ``raw_of`` turns them into one side's raw means (a "Rest" side is all cells minus set1).
Used by ``trainer.jobs.de``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from trainer import differential as D
from trainer import dist
from trainer.infer_config import InferConfig
from trainer.jobs.common import InferError

RAW_ROWS = 4096  # store rows per step of the raw-statistics pass
REST = "Rest"


@dataclass(frozen=True)
class Comparison:
    group1: str
    group2: str
    set1: int  # index into the cell sets
    set2: int | None  # None = every cell not in set1


# ------------------------------------------------------------------------------------------ groups
def _read_ids(path: str, obs: pd.DataFrame) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise InferError(f"cell-id file {p} does not exist")
    ids = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not ids:
        raise InferError(f"cell-id file {p} is empty")
    pos = obs.index.get_indexer(pd.Index(ids).unique())
    if (pos < 0).any():
        missing = [i for i, q in zip(pd.Index(ids).unique(), pos, strict=True) if q < 0]
        raise InferError(f"{len(missing)} cell ids of {p} are not in the store (first: {missing[:3]})")
    return np.sort(pos).astype(np.int64)


def cell_sets(cfg: InferConfig, obs: pd.DataFrame) -> tuple[list[np.ndarray], list[Comparison], bool]:
    """(cell sets as sorted row indices, comparisons, groupby mode?) from the de options."""
    o = cfg.de
    if o.cells1 is not None:
        if o.groupby is not None or o.group1 is not None or o.group2 is not None:
            # group1 / group2 name groups of a groupby column: with cell files they were silently ignored
            raise InferError("give either de.groupby (with de.group1 / de.group2) or de.cells1 / de.cells2 "
                             "(explicit cell sets), not both")
        sets = [_read_ids(o.cells1, obs)] + ([_read_ids(o.cells2, obs)] if o.cells2 else [])
        if o.cells2:
            # a cell in both files belongs to group 2, as in the reference (its labels for cells2 are
            # written after those for cells1 and overwrite them)
            only1 = np.setdiff1d(sets[0], sets[1], assume_unique=True)
            if len(only1) == 0:
                raise InferError(f"every cell of {o.cells1} is also in {o.cells2}: group 1 is empty")
            sets[0] = only1
        return sets, [Comparison("cells1", "cells2" if o.cells2 else REST, 0, 1 if o.cells2 else None)], False
    if o.groupby is None:
        raise InferError("set de.groupby (an obs column) or de.cells1 (a file of cell ids)")
    if o.groupby not in obs.columns:
        raise InferError(f"de.groupby column {o.groupby!r} is not in the store's obs (columns: {list(obs.columns)})")
    col = obs[o.groupby]
    values = col.astype(str).where(col.notna(), None).to_numpy(dtype=object)
    present = pd.unique(values[pd.notna(values)])
    if isinstance(col.dtype, pd.CategoricalDtype):  # category order, as the reference lists groups
        present = [str(c) for c in col.cat.categories if str(c) in set(present)]
    elif col.dtype.kind in "iuf":  # numbers in numeric order, as the reference's categories ("2" before "10")
        present = sorted(present, key=float)
    else:
        present = sorted(present)
    for g in list(o.group1 or []) + ([o.group2] if o.group2 is not None else []):
        if str(g) not in present:
            # every group up to 50 (a silently cut list hid the 21st group of a 21-type atlas)
            shown = present if len(present) <= 50 else [*present[:50], "..."]
            raise InferError(f"group {g!r} has no cells in column {o.groupby!r} ({len(present)} groups: {shown})")
    # group1 null: every group (but group2, when given: "each group against group2")
    group1 = [str(g) for g in o.group1] if o.group1 is not None else \
        [g for g in present if o.group2 is None or g != str(o.group2)]
    if o.group1 is None and len(present) < 2:
        raise InferError(f"column {o.groupby!r} has a single group: nothing to compare")
    names = list(dict.fromkeys(group1 + ([str(o.group2)] if o.group2 is not None else [])))
    sets = [np.flatnonzero(values == g).astype(np.int64) for g in names]
    comps = [Comparison(g, REST if o.group2 is None else str(o.group2), names.index(g),
                        None if o.group2 is None else names.index(str(o.group2))) for g in group1]
    for c in comps:
        if c.set2 is None and len(sets[c.set1]) == len(obs):
            raise InferError(f"group {c.group1!r} holds every cell: the rest is empty")
        if c.set2 is not None and c.set1 == c.set2:
            raise InferError(f"group1 and group2 are the same group {c.group1!r}")
    return sets, comps, True


def complement(cells: np.ndarray, n: int) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[cells] = False
    return np.flatnonzero(keep)


# ------------------------------------------------------------------------------------ raw statistics
def raw_sums(store, modality: str, sets: list[np.ndarray], feat: np.ndarray, with_norm: bool,
             rank: int = 0, world_size: int = 1) -> dict[str, np.ndarray]:
    """Per-set sums over all cells (sets x features, float64) plus a last row for ALL cells.

    ``norm``: counts scaled by 1e4 / the cell's total RNA count (over all genes); cells with no RNA
    count add zero (the reference's sparse path does the same; its dense path gives NaN).
    """
    n = store.meta.n_cells
    rows = np.concatenate([s for s in sets] + [np.arange(n)])
    cols = np.concatenate([np.full(len(s), j) for j, s in enumerate(sets)] + [np.full(n, len(sets))])
    member = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, len(sets) + 1))
    out = {k: np.zeros((len(sets) + 1, len(feat))) for k in (["sum", "nnz"] + (["norm"] if with_norm else []))}
    offs = store.meta.shard_offsets
    steps = [(s, a, min(a + RAW_ROWS, offs[s + 1] - offs[s])) for s in range(store.meta.n_shards)
             for a in range(0, offs[s + 1] - offs[s], RAW_ROWS)]
    for s, a, b in steps[rank::world_size]:
        x = store.read_rows(modality, s, a, b).astype(np.float64)
        mt = member[offs[s] + a: offs[s] + b].T.tocsr()
        xs = x[:, feat]
        out["sum"] += (mt @ xs).toarray()
        out["nnz"] += (mt @ (xs > 0).astype(np.float64)).toarray()
        if with_norm:
            total = np.asarray(x.sum(axis=1)).ravel()
            scale = np.divide(1e4, total, out=np.zeros_like(total), where=total > 0)
            out["norm"] += (mt @ sp.diags(scale) @ xs).toarray()
    if dist.is_distributed():
        dev = dist._collective_device()  # NCCL reduces CUDA tensors only
        for k, v in out.items():
            t = torch.from_numpy(v).to(dev)
            torch.distributed.all_reduce(t)
            out[k] = t.cpu().numpy()
    return out


def raw_of(sums: dict, j: int | None, set1: int, n: dict) -> dict[str, np.ndarray]:
    """Raw means of set ``j`` (None = all cells except set ``set1``)."""
    if j is not None:
        return D.raw_columns({k: v[j] for k, v in sums.items()}, n[j])
    return D.raw_columns({k: v[-1] - v[set1] for k, v in sums.items()}, n["all"] - n[set1])
