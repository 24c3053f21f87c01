"""Input adapters of the notebook API (``trainer.api``): a store path, an AnnData (genes then peaks), a
MuData or a ``{"rna": ..., "atac": ...}`` dict -> consecutive minibatches in the loader's format.

Features are matched to the model's by name, categorical obs columns to the model's categories by
label, and the modality mask follows the rules documented in ``trainer.api`` (never silently "an
all-zero row means missing").
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data import keys
from data.collate import atac_library_max, size_factor_rows
from data.convert.align import summed_duplicates
from data.convert.base import as_mask
from data.validate import ValidationError, check_cont
from trainer.export import SIZE_FACTOR_COLUMNS, imported_size_factor_columns, training_atac_library_max
from trainer.jobs.common import inference_stream, open_checked_store

if TYPE_CHECKING:
    from trainer.api import Model

_MODALITY_COLUMN = {"paired": (True, True), "expression": (True, False), "accessibility": (False, True)}


class APIError(ValueError):
    """Bad input to the notebook API (data layout, features, labels, arguments); one-line message."""


class _Source:
    """n_obs, obs and an iterator of (lo, hi, minibatch dict) over consecutive cells."""

    def __init__(self, n_obs: int, obs: pd.DataFrame, batches):
        self.n_obs, self.obs, self.batches = n_obs, obs, batches


def source(model: Model, data, mask, batch_size: int) -> _Source:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise APIError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(data, (str, os.PathLike)):
        if mask is not None:
            raise APIError("a store has its own modality columns: mask= is only for in-memory data")
        return _store_source(model, data, batch_size)
    if model.module.modality_weights == "cell":
        # the weights are rows of a table indexed by training cell, and in-memory cells carry no index
        # into it (they would read the first n training cells' weights); the reference refuses too
        raise APIError("this model learned per-cell modality weights (modality_weights=cell) for its training "
                       "cells: pass its training store's path, not in-memory data")
    import anndata as ad
    import mudata as md

    if isinstance(data, (dict, tuple, list)):
        if not isinstance(data, dict) and len(data) != 2:  # zip() dropped a third item without a word
            raise APIError(f"a pair of modalities is (rna, atac) (either may be None), got {len(data)} items")
        parts = dict(data) if isinstance(data, dict) else dict(zip(keys.MODALITIES, data, strict=True))
        bad = set(parts) - set(keys.MODALITIES)
        if bad or not parts:
            raise APIError(f"a dict of AnnData must have keys 'rna' and/or 'atac', got {sorted(parts)}")
        kinds = {k: type(v).__name__ for k, v in parts.items() if v is not None and not isinstance(v, ad.AnnData)}
        if kinds:
            raise APIError(f"a dict (or pair) of modalities holds AnnData (or None) per modality, got {kinds}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            data = md.MuData({k: v for k, v in parts.items() if v is not None})
    if isinstance(data, md.MuData):
        for name, a in data.mod.items():
            _check_counts_layout(a, f"MuData '{name}'")
        return _mudata_source(model, data, mask, batch_size)
    if isinstance(data, ad.AnnData):
        _check_counts_layout(data, "AnnData")
        return _anndata_source(model, data, mask, batch_size)
    raise APIError(f"data must be a store path, AnnData, MuData or {{'rna': AnnData, 'atac': AnnData}}, "
                   f"got {type(data).__name__}")


def _check_counts_layout(adata, what: str) -> None:
    """Raw counts in X and unique cell ids: one clear line instead of a TypeError / pandas error later."""
    if adata.X is None:
        layers = list(adata.layers.keys()) if adata.layers is not None else []
        raise APIError(f"{what} has no X (counts in a layer? {layers[:5]}): put the raw counts in X, "
                       "e.g. adata.X = adata.layers['counts']")
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()][0]
        raise APIError(f"{what} cell ids (obs_names) are not unique (e.g. {dup!r}); adata.obs_names_make_unique()")


def _store_source(model: Model, path, batch_size: int) -> _Source:
    store = open_checked_store(path, model.info)
    stream = inference_stream(store, model.module, model.info, batch_size=batch_size, split="all", shuffle=False,
                              prefetch=0)
    n = store.meta.n_cells

    def batches() -> Iterator:
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            yield lo, hi, stream.make_batch(np.arange(lo, hi, dtype=np.int64))

    return _Source(n, store.read_obs(), batches)


def _columns(var_names: pd.Index, names: list[str], what: str) -> np.ndarray | None:
    """Column positions of the model's features (None = already in order); refuses other feature sets."""
    if list(var_names) == names:
        return None
    if not var_names.is_unique:
        raise APIError(f"the {what} var_names are not unique")
    missing, extra = set(names) - set(var_names), set(var_names) - set(names)
    if missing or extra:
        raise APIError(f"{what} features differ from the model's: {len(missing)} missing (e.g. "
                       f"{sorted(missing)[:5]}), {len(extra)} not in the model (e.g. {sorted(extra)[:5]})")
    return var_names.get_indexer(names)


def _anndata_source(model: Model, adata, mask, batch_size: int) -> _Source:
    genes, regions = model.gene_names, model.region_names
    cols = _columns(adata.var_names, genes + regions, "AnnData")
    cols = np.arange(len(genes) + len(regions)) if cols is None else cols
    rows = np.arange(adata.n_obs)
    feats = {keys.RNA: (adata.X, rows, cols[: len(genes)]), keys.ATAC: (adata.X, rows, cols[len(genes):])}
    m = _explicit_mask(mask, adata.obs, adata.n_obs)
    inferred = m is None
    if inferred:
        m = np.ones((adata.n_obs, 2), dtype=bool)
    return _memory_source(model, adata.obs, feats, m, batch_size, inferred=inferred)


def _mudata_source(model: Model, mdata, mask, batch_size: int) -> _Source:
    unknown = set(mdata.mod) - set(keys.MODALITIES)
    if unknown:
        raise APIError(f"MuData modalities must be 'rna' and/or 'atac' (our model has no {sorted(unknown)})")
    obs, n = mdata.obs, mdata.n_obs
    feats, member, pulled = {}, np.zeros((n, 2), dtype=bool), {}
    for mod, names in ((keys.RNA, model.gene_names), (keys.ATAC, model.region_names)):
        if mod not in mdata.mod:
            continue
        a = mdata.mod[mod]
        rows = a.obs_names.get_indexer(mdata.obs_names)
        # the modality's own obs columns as 'mod:col', as mudata < 0.4 pulls them on update (0.4 stops): read alike
        pulled.update({f"{mod}:{c}": pd.Series(a.obs[c].to_numpy()[np.maximum(rows, 0)], index=obs.index,
                                               dtype=object).where(rows >= 0)
                       for c in a.obs.columns if f"{mod}:{c}" not in obs and c not in obs})
        cols = _columns(a.var_names, names, f"MuData '{mod}'")
        feats[mod] = (a.X, rows, cols)
        member[:, keys.MASK_COLUMN[mod]] = rows >= 0
    obs = pd.concat([obs, pd.DataFrame(pulled, index=obs.index)], axis=1) if pulled else obs
    m = _explicit_mask(mask, obs, n)
    if m is not None:
        _check_membership(m, member, feats, mdata.obs_names)
    return _memory_source(model, obs, feats, member if m is None else m, batch_size, inferred=m is None)


def _check_membership(mask: np.ndarray, member: np.ndarray, feats: dict, names: pd.Index) -> None:
    """A cell the mask calls measured in a modality the MuData has must be in that modality's AnnData:
    it was read as an all-zero row, i.e. other latents without a word. (A modality the MuData lacks
    altogether means none, as documented.)"""
    for mod in feats:
        j = keys.MASK_COLUMN[mod]
        absent = np.flatnonzero(mask[:, j] & ~member[:, j])
        if len(absent):
            raise APIError(f"{len(absent)} cells are measured in {mod} by the mask but not in the MuData {mod!r} "
                           f"modality (e.g. {names[absent[0]]!r}): add their {mod} rows, or mark them unmeasured")


def _explicit_mask(mask, obs: pd.DataFrame, n: int) -> np.ndarray | None:
    """Rules 1-3 of the module docstring, or None when none applies. A MuData's (or a dict's) obs holds its
    modalities' own columns as 'rna:mask_rna', 'atac:mask_rna', ...: they count as well (they were ignored,
    and every cell was then taken as measured in both)."""
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != (n, 2) or m.dtype != bool:
            raise APIError(f"mask must be a boolean array of shape ({n}, 2), got {m.dtype} {m.shape}")
        return m
    cols = {c: _obs_values(obs, c, lambda v, c=c: pd.Series(_parse_mask(v, c), index=v.index))
            for c in ("mask_rna", "mask_atac")}
    if (cols["mask_rna"] is None) != (cols["mask_atac"] is None):
        have = "mask_rna" if cols["mask_rna"] is not None else "mask_atac"
        raise APIError(f"obs has {have!r} but not its partner: give both mask_rna and mask_atac, or neither")
    if cols["mask_rna"] is not None:
        return np.stack([_parse_mask(cols[c], c) for c in ("mask_rna", "mask_atac")], axis=1)
    # as mva-build reads it; a missing value stays missing (as text it was 'nan', refused naming no cell)
    values = _obs_values(obs, "modality", lambda v: v.astype(str).str.lower().where(v.notna()))
    if values is not None:
        if values.isna().any():
            raise APIError(f"obs['modality'] is missing for cell {values.index[values.isna().to_numpy()][0]!r}")
        bad = ~values.isin(list(_MODALITY_COLUMN)).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise APIError(f"obs['modality'] of cell {values.index[i]!r} is {values.iloc[i]!r} ({int(bad.sum())} such "
                           f"cells); expected one of {list(_MODALITY_COLUMN)}")
        return np.array([_MODALITY_COLUMN[v] for v in values], dtype=bool).reshape(n, 2)
    return None


def _parse_mask(v: pd.Series, name: str) -> np.ndarray:
    try:  # the store builder's rules: bools, 0/1 or true/false text; NaN or anything else refused, naming the cell
        return as_mask(v, "obs", name).astype(bool)
    except ValueError as exc:
        raise APIError(str(exc)) from None


def _obs_values(obs: pd.DataFrame, key: str, parse=None) -> pd.Series | None:
    """A top-level obs column, else (MuData, dict) the modalities' own 'rna:key' / 'atac:key' columns merged, or
    None. ``parse`` (applied where set) reads each value first; a cell whose two values differ is refused, and
    with ``parse`` (the columns that decide a cell's modalities) the top-level value must agree with them too."""
    names = [f"{m}:{key}" for m in keys.MODALITIES if f"{m}:{key}" in obs]
    if key in obs and (parse is None or not names):
        return obs[key] if parse is None else parse(obs[key])
    if key in obs:  # what decides a cell's modalities: the top level wins, but must not contradict them
        names = [key, *names]  # (a MuData's obs['modality'] = 'paired' over its modalities' own columns silently
        # encoded every single-modality cell from its empty row)
    if not names:
        return None
    parse = parse or (lambda v: v)
    parsed = [pd.Series(None, index=obs.index, dtype=object) for _ in names]
    for name, out in zip(names, parsed):
        have = obs[name].notna().to_numpy()
        out[have] = np.asarray(parse(obs[name][have]), dtype=object)
    for other, values in zip(names[1:], parsed[1:]):
        differ = (parsed[0].notna() & values.notna() & (parsed[0] != values)).to_numpy()
        if differ.any():
            cell = obs.index[np.flatnonzero(differ)[0]]
            raise APIError(f"obs {names[0]!r} and {other!r} disagree for cell {cell!r} ({obs[names[0]][cell]!r} vs "
                           f"{obs[other][cell]!r}): give the cell's {key} once, in the MuData's obs")
    if key in obs:
        return parse(obs[key])  # the top level as it stands (its own missing values are refused by the caller)
    return parsed[0].where(parsed[0].notna(), parsed[-1])


def _codes_of(obs: pd.DataFrame, key: str, categories: list[str], what: str) -> np.ndarray:
    values = _obs_values(obs, key)
    if values is None:
        if len(categories) <= 1:
            return np.zeros(len(obs), dtype=np.int64)  # a single-category model: nothing to choose
        raise APIError(f"obs has no column {key!r} ({what}); the model knows {categories[:10]}")
    if values.isna().any():
        raise APIError(f"obs[{key!r}] ({what}) is missing for {int(values.isna().sum())} cells")
    labels = values.astype(str).to_numpy()
    codes = pd.Categorical(labels, categories=categories).codes.astype(np.int64)
    if (codes < 0).any():
        unknown = sorted(set(labels[codes < 0]))
        raise APIError(f"obs[{key!r}] ({what}) has labels the model was not trained on: {unknown[:10]}; "
                       f"the model knows {categories[:10]}")
    return codes


def _rows(x, rows: np.ndarray, cols: np.ndarray | None, keep: np.ndarray) -> sp.csr_matrix:
    """CSR of the given rows (-1 or keep=False: an empty row) and columns, in the model's feature order."""
    n_cols = x.shape[1] if cols is None else len(cols)
    take = (rows >= 0) & keep
    idx = rows[take]
    # a backed (h5py) X reads rows only in increasing order: a MuData modality listing the cells in another
    # order than the MuData ended in a TypeError; read sorted, then put the rows back in the cells' order
    order = np.argsort(idx, kind="stable") if np.any(np.diff(idx) < 0) else None
    sub = x[idx if order is None else idx[order]] if take.any() else x[:0]
    if not sp.issparse(sub):
        sub = np.asarray(sub)  # scipy has no float16 (a raw scipy error); float32 holds its values exactly
        sub = sp.csr_matrix(sub.astype(np.float32) if sub.dtype == np.float16 else sub)
    sub = sub.tocsr()
    if order is not None:
        sub = sub[np.argsort(order)]
    sub = summed_duplicates(sub)  # the kernels want one entry per (cell, feature)
    if cols is not None:
        sub = sub[:, cols]
    nnz = np.zeros(len(rows), dtype=np.int64)
    nnz[take] = np.diff(sub.indptr)
    indptr = np.concatenate([[0], np.cumsum(nnz)])
    return sp.csr_matrix((sub.data.astype(np.float32), sub.indices, indptr), shape=(len(rows), n_cols))


def _check_counts(x: sp.csr_matrix, mod: str, names: pd.Index) -> None:
    """Raw counts only: the encoders read counts and the likelihoods score them, so a normalised or log1p X
    gave other latents without a word (the store builder refuses such input; the reference warns)."""
    d = x.data
    bad = ~np.isfinite(d) | (d < 0) | (d != np.round(d))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(x.indptr, i, side="right")) - 1
        raise APIError(f"the {mod} counts must be non-negative integers (raw counts), but cell {names[row]!r} has "
                       f"{float(d[i])!r}: pass the raw counts in X (e.g. adata.X = adata.layers['counts'])")


def _torch_csr(x: sp.csr_matrix) -> torch.Tensor:
    return torch.sparse_csr_tensor(torch.from_numpy(x.indptr.astype(np.int64)),
                                   torch.from_numpy(x.indices.astype(np.int64)),
                                   torch.from_numpy(x.data.astype(np.float32)), size=x.shape,
                                   check_invariants=False)  # canonical scipy CSR (_rows): valid


def _memory_source(model: Model, obs: pd.DataFrame, feats: dict[str, Any], mask: np.ndarray, batch_size: int,
                   inferred: bool) -> _Source:
    info, n = model.info, len(obs)
    width = {keys.RNA: len(model.gene_names), keys.ATAC: len(model.region_names)}
    batch = _codes_of(obs, info["batch_key"], list(info["batch_categories"]), "batch")
    cats = np.stack([_codes_of(obs, k, list(info["cat_cov_categories"][k]), "covariate")
                     for k in info["cat_cov_keys"]], axis=1) if info["cat_cov_keys"] else np.zeros((n, 0), np.int64)
    cont = []
    for k in info["cont_cov_keys"]:
        v = _obs_values(obs, k)
        if v is None or v.isna().any():
            raise APIError(f"obs column {k!r} (continuous covariate) is missing or has missing values")
        try:  # mva-build's rule: numeric, finite, within float32 (inf gave NaN outputs for that cell, silently)
            check_cont(pd.DataFrame({k: v}), [k], "data")
        except ValidationError as exc:
            raise APIError(str(exc)) from None
        cont.append(v.to_numpy(np.float32))
    cont = np.stack(cont, axis=1) if cont else np.zeros((n, 0), np.float32)
    mask = mask.copy()
    for mod in keys.MODALITIES:
        if mod not in feats:
            mask[:, keys.MASK_COLUMN[mod]] = False
    neither = np.flatnonzero(~mask.any(axis=1))
    if len(neither):  # nothing to encode: each got the same point, a latent that means nothing (mva-build refuses too)
        raise APIError(f"{len(neither)} cells are measured in neither modality (e.g. {obs.index[neither[0]]!r}): "
                       "drop them, or mark the modality they have in mask= / mask_rna / mask_atac")

    def chunk(lo: int, hi: int) -> dict:
        m = mask[lo:hi]
        out = {}
        for mod in keys.MODALITIES:
            if mod in feats:
                x, rows, cols = feats[mod]
                out[mod] = _rows(x, rows[lo:hi], cols, m[:, keys.MASK_COLUMN[mod]])
                _check_counts(out[mod], mod, obs.index[lo:hi])
            else:
                out[mod] = sp.csr_matrix((hi - lo, width[mod]), dtype=np.float32)
        b = {mod: _torch_csr(out[mod]) for mod in keys.MODALITIES}
        b.update({keys.MASK: torch.from_numpy(m.copy()), keys.BATCH: torch.from_numpy(batch[lo:hi]),
                  keys.CAT_COVS: torch.from_numpy(cats[lo:hi]), keys.CONT_COVS: torch.from_numpy(cont[lo:hi]),
                  keys.INDEX: torch.arange(lo, hi, dtype=torch.int64)})
        if model.module.use_size_factor and given_sf is not None:  # store_to_mudata's (store-wide) columns
            b[keys.SIZE_FACTOR] = torch.from_numpy(given_sf[lo:hi].copy())
        elif model.module.use_size_factor:  # data.collate's formula (ATAC over the training store's largest total)
            tot = np.stack([np.asarray(out[mod].sum(axis=1)).ravel() for mod in keys.MODALITIES], axis=1)
            b[keys.SIZE_FACTOR] = torch.from_numpy(size_factor_rows(tot, m, atac_max))
        return b, out

    # size factors given with the data (the columns trainer.scvi_io.store_to_mudata writes, computed over
    # the whole store, or those a model imported from scvi-tools was trained with) are used as they are: a
    # subset of a store's cells then gets the store's factors, an imported model the reference's
    given_sf = None
    sf_columns = list(info.get("size_factor_keys") or SIZE_FACTOR_COLUMNS)
    # our own columns of a model that keeps its training scale are recomputed from the counts instead: the
    # same RNA factors, and ATAC over the training store's largest total, not over the store_to_mudata(B)
    # was called with (which gave another latent for the same cells than the store B itself)
    trained_max = training_atac_library_max(info)
    imported = imported_size_factor_columns(info)  # [] for our own columns
    ours_recomputed = not imported and trained_max is not None
    missing = [c for c in imported if c not in obs]
    if missing:
        # an imported model's own columns: its factors are whatever the user computed, so our formula (RNA
        # total, ATAC over the largest total) would silently stand in for them (scvi-tools refuses too)
        raise APIError(f"the model was trained with size factors from obs columns {sf_columns} (scvi-tools' "
                       f"size_factor_key); {missing} {'is' if len(missing) == 1 else 'are'} not in this data's obs")
    if model.module.use_size_factor and all(c in obs for c in sf_columns) and not ours_recomputed:
        given_sf = np.stack([obs[c].to_numpy(np.float32) for c in sf_columns], axis=1)
        # NaN (cells joined from elsewhere) gave NaN outputs; 0 is the reference's "no library" (it adds 1e-6)
        bad = ~np.isfinite(given_sf) | (given_sf < 0)
        if bad.any():
            j = int(np.flatnonzero(bad.any(axis=0))[0])
            raise APIError(f"obs[{sf_columns[j]!r}] (size factors) is missing, negative or infinite for "
                           f"{int(bad[:, j].sum())} cells (e.g. {obs.index[np.flatnonzero(bad[:, j])[0]]!r}); "
                           + ("fill it: an imported model reads its size factors from these columns (computed by whoever "
                              "trained it), not from the counts" if imported else
                              "fill it, or drop the size factor columns to compute them from these cells' counts"))
    atac_max = trained_max or 1.0  # read by chunk() when it runs, after this pass
    if model.module.use_size_factor and given_sf is None and keys.ATAC in feats \
            and trained_max is None:  # a model exported before the value was kept: these cells' max
        j = keys.MASK_COLUMN[keys.ATAC]
        for lo in range(0, n, batch_size):
            x, rows, cols = feats[keys.ATAC]
            hi = min(lo + batch_size, n)
            part = _rows(x, rows[lo:hi], cols, mask[lo:hi, j])
            atac_max = max(atac_max, atac_library_max(np.asarray(part.sum(axis=1)).ravel(), mask[lo:hi, j]))

    if inferred:  # rules 4-5 can count an all-zero row as measured: say so (one pass, a batch at a time)
        zero = [0, 0]
        for lo in range(0, n, batch_size):
            _, out = chunk(lo, min(lo + batch_size, n))
            m = mask[lo:lo + batch_size]
            for mod in keys.MODALITIES:
                j = keys.MASK_COLUMN[mod]
                zero[j] += int((m[:, j] & (np.asarray(out[mod].sum(axis=1)).ravel() == 0)).sum())
        if any(zero):
            warnings.warn(f"{zero[0]} cells with an all-zero RNA row and {zero[1]} with an all-zero ATAC row are "
                          f"treated as MEASURED (no mask= argument, no mask_rna/mask_atac or 'modality' obs "
                          f"column); if they lack that modality, pass mask= or a 'modality' column",
                          UserWarning, stacklevel=4)

    def batches() -> Iterator:
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            yield lo, hi, chunk(lo, hi)[0]

    return _Source(n, obs, batches)
