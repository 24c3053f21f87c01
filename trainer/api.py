"""Notebook API: load a trained model, then latents, expression or accessibility for in-memory data.

    from trainer import api
    model = api.load("outputs/demo/run-X")          # a run dir, an exported model dir, or a scvi-tools dir
    z = model.latent(mdata)                          # (cells, n_latent) numpy, joint posterior mean
    rho = model.expression(mdata, transform_batch="batch_0", genes=["CD3E"], as_anndata=True)
    p = model.accessibility("outputs/demo/store", normalize_cells=True)

Same semantics (and the same ``trainer.predict`` math) as the ``mva-infer`` jobs embed / expression /
accessibility: ``give_mean`` / ``n_samples`` / ``seed`` behave as the jobs' keys (posterior samples seed
from (seed, chunk) with chunks of ``batch_size`` cells, so equal settings give equal numbers), and
``transform_batch`` takes the model's batch labels or integer codes (a list is averaged).

``data`` is one of: a store path; an AnnData whose var_names are the model's genes and regions (the
genes-then-peaks layout); a MuData with modalities ``rna`` and/or ``atac``; or a dict / pair of AnnData
``{"rna": ..., "atac": ...}`` (turned into a MuData). Feature names must be exactly the model's (any
order; missing or extra names are an error). Cells are processed ``batch_size`` at a time: memory is one
batch x features plus the result (the result itself is cells x features: for atlas-size outputs use the
jobs, which write chunks to disk). Categorical obs columns (the model's batch key and covariates) are
mapped to the model's categories by label; an unknown label is an error.

Which modalities a cell has (the mask) is explicit, decided by the first rule that applies:

1. the ``mask=`` argument, a (cells, 2) boolean array [RNA measured, ATAC measured];
2. obs columns ``mask_rna`` and ``mask_atac`` (the store's names);
3. an obs column ``modality`` with values ``paired`` / ``expression`` / ``accessibility`` (what
   ``scvi.data.organize_multiome_anndatas`` writes);
4. MuData / dict: a cell has a modality when it is in that modality's AnnData (absent modality: none);
5. a single AnnData: every cell has both.

Rules 4 and 5 may count a cell as measured although its row is all zero (scvi-tools' convention for
"missing"); that is never decided silently: a warning gives the number of such cells and the fix
(pass ``mask=`` or a ``modality`` column). Rows of cells without a modality are ignored (treated as empty).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data import keys
from data.collate import to_device
from trainer import predict
from trainer.export import INFO, load_model
from trainer.jobs.common import open_checked_store, resolve_model_dir

_MODALITY = {"joint": "joint", "expression": "rna", "rna": "rna", "accessibility": "atac", "atac": "atac"}
_OBSM = {"joint": "X_multivi", "rna": "X_multivi_expression", "atac": "X_multivi_accessibility"}
_MODALITY_COLUMN = {"paired": (True, True), "expression": (True, False), "accessibility": (False, True)}


class APIError(ValueError):
    """Bad input to the notebook API (data layout, features, labels, arguments); one-line message."""


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Model:
    """A trained model from a run directory, an exported model directory or a scvi-tools MULTIVI directory."""
    p = Path(path)
    if (p / "model.pt").is_file() and not (p / INFO).is_file():
        from trainer.scvi_io import import_from_scvi

        tmp = tempfile.mkdtemp(prefix="mva-import-")
        atexit.register(shutil.rmtree, tmp, True)  # the converted copy lives as long as this Python session
        p = import_from_scvi(p, Path(tmp) / "model")
    model_dir = resolve_model_dir(p)
    module, info = load_model(model_dir, device=device)
    return Model(module, info, model_dir)


class Model:
    def __init__(self, module, info: dict, model_dir: Path):
        self.module, self.info, self.model_dir = module, info, model_dir
        self.device = next(module.parameters()).device

    @property
    def gene_names(self) -> list[str]:
        return list(self.info["gene_names"])

    @property
    def region_names(self) -> list[str]:
        return list(self.info["region_names"])

    @property
    def batch_categories(self) -> list[str]:
        return list(self.info["batch_categories"])

    def __repr__(self) -> str:
        return (f"Model({self.model_dir}: {len(self.gene_names)} genes, {len(self.region_names)} regions, "
                f"{self.module.n_batch} batches, n_latent={self.module.n_latent})")

    # ------------------------------------------------------------------------------ public methods
    def latent(self, data, modality: str = "joint", give_mean: bool = True, n_samples: int = 1, seed: int = 0,
               batch_size: int = 1024, mask=None, as_anndata: bool = False):
        """Posterior means (cells, d), or samples: (cells, d) for one, (cells, n_samples, d) for several."""
        if modality not in _MODALITY:
            raise APIError(f"modality must be one of {list(_MODALITY)}, got {modality!r}")
        _check_samples(give_mean, n_samples)
        mod = _MODALITY[modality]

        def fn(batch):
            if give_mean:
                return predict.latent(self.module, batch, mod)
            z = predict.latent(self.module, batch, mod, give_mean=False, n_samples=n_samples)
            return z[0] if n_samples == 1 else z.transpose(0, 1)

        tail = () if give_mean or n_samples == 1 else (n_samples,)
        src = _source(self, data, mask, batch_size)
        out = self._collect(src, fn, (*tail, self.module.n_latent), seed, give_mean)
        if not as_anndata:
            return out
        import anndata as ad

        return ad.AnnData(obs=src.obs.copy(), obsm={_OBSM[mod]: out})

    def expression(self, data, transform_batch=None, library_size: float | str = 1.0,
                   genes: Sequence[str] | None = None, give_mean: bool = True, n_samples: int = 1, seed: int = 0,
                   batch_size: int = 1024, mask=None, as_anndata: bool = False):
        """Normalized expression (cells, genes): rho times ``library_size`` (a number or "observed")."""
        _check_samples(give_mean, n_samples)
        index, names = _select(genes, self.gene_names, "gene")
        codes = self._codes(transform_batch)

        def fn(batch):
            return predict.normalized_expression(self.module, batch, transform_batch=codes,
                                                 library_size=library_size, n_samples=n_samples,
                                                 use_z_mean=give_mean, gene_index=index)

        src = _source(self, data, mask, batch_size)
        out = self._collect(src, fn, (len(names),), seed, give_mean)
        return _as_anndata(src, out, names) if as_anndata else out

    def accessibility(self, data, normalize_cells: bool = False, normalize_regions: bool = False,
                      regions: Sequence[str] | None = None, transform_batch=None, threshold: float | None = None,
                      give_mean: bool = True, n_samples: int = 1, seed: int = 0, batch_size: int = 1024,
                      mask=None, as_anndata: bool = False):
        """Accessibility probabilities (cells, regions); with ``threshold`` a CSR matrix of the p >= threshold."""
        _check_samples(give_mean, n_samples)
        if threshold is not None and not 0 <= threshold <= 1:
            raise APIError(f"threshold must be in [0, 1], got {threshold}")
        index, names = _select(regions, self.region_names, "region")
        codes = self._codes(transform_batch)

        def fn(batch):
            return predict.normalized_accessibility(self.module, batch, transform_batch=codes,
                                                    normalize_cells=normalize_cells,
                                                    normalize_regions=normalize_regions, n_samples=n_samples,
                                                    use_z_mean=give_mean, region_index=index)

        src = _source(self, data, mask, batch_size)
        out = self._collect(src, fn, (len(names),), seed, give_mean, sparse_threshold=threshold)
        return _as_anndata(src, out, names) if as_anndata else out

    # ------------------------------------------------------------------------------ internals
    def _codes(self, transform_batch) -> list[int] | None:
        if transform_batch is None:
            return None
        try:
            codes = predict.resolve_batch_codes(transform_batch, self.batch_categories)
            predict._check_codes(self.module, codes)
        except ValueError as exc:
            raise APIError(str(exc)) from None
        return codes

    @torch.no_grad()
    def _collect(self, src, fn, shape: tuple, seed: int, give_mean: bool, sparse_threshold=None):
        out = None if sparse_threshold is not None else np.empty((src.n_obs, *shape), dtype=np.float32)
        parts = []
        for k, (lo, hi, batch) in enumerate(src.batches()):
            if not give_mean:
                torch.manual_seed(seed * 1_000_003 + k)  # the jobs' per-chunk seeding
            values = fn(to_device(batch, self.device)).to("cpu", torch.float32).numpy()
            if out is not None:
                out[lo:hi] = values
            else:
                parts.append(sp.csr_matrix(np.where(values >= sparse_threshold, values, 0.0)))
        if out is None:
            return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, shape[-1]), dtype=np.float32)
        return out


def _check_samples(give_mean: bool, n_samples: int) -> None:
    if n_samples < 1:
        raise APIError(f"n_samples must be >= 1, got {n_samples}")
    if give_mean and n_samples != 1:
        raise APIError("n_samples > 1 draws posterior samples: pass give_mean=False")


def _select(wanted, names: list[str], what: str) -> tuple[list[int] | None, list[str]]:
    if wanted is None:
        return None, names
    wanted = [str(w) for w in ([wanted] if isinstance(wanted, str) else wanted)]
    pos = {n: i for i, n in enumerate(names)}
    unknown = [w for w in wanted if w not in pos]
    if unknown or not wanted or len(set(wanted)) != len(wanted):
        raise APIError(f"bad {what} subset: unknown {unknown[:10]}, or empty / repeated names")
    return [pos[w] for w in wanted], wanted


def _as_anndata(src, out, names: list[str]):
    import anndata as ad

    return ad.AnnData(X=out, obs=src.obs.copy(), var=pd.DataFrame(index=pd.Index(names, dtype=object)))


# ================================================================================ data sources
class _Source:
    """n_obs, obs and an iterator of (lo, hi, minibatch dict) over consecutive cells."""

    def __init__(self, n_obs: int, obs: pd.DataFrame, batches):
        self.n_obs, self.obs, self.batches = n_obs, obs, batches


def _source(model: Model, data, mask, batch_size: int) -> _Source:
    if batch_size < 1:
        raise APIError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, (str, os.PathLike)):
        if mask is not None:
            raise APIError("a store has its own modality columns: mask= is only for in-memory data")
        return _store_source(model, data, batch_size)
    import anndata as ad
    import mudata as md

    if isinstance(data, (dict, tuple, list)):
        parts = dict(data) if isinstance(data, dict) else dict(zip(keys.MODALITIES, data))
        bad = set(parts) - set(keys.MODALITIES)
        if bad or not parts:
            raise APIError(f"a dict of AnnData must have keys 'rna' and/or 'atac', got {sorted(parts)}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            data = md.MuData({k: v for k, v in parts.items() if v is not None})
    if isinstance(data, md.MuData):
        return _mudata_source(model, data, mask, batch_size)
    if isinstance(data, ad.AnnData):
        return _anndata_source(model, data, mask, batch_size)
    raise APIError(f"data must be a store path, AnnData, MuData or {{'rna': AnnData, 'atac': AnnData}}, "
                   f"got {type(data).__name__}")


def _store_source(model: Model, path, batch_size: int) -> _Source:
    from data.stream import StoreStream

    store = open_checked_store(path, model.info)
    stream = StoreStream(store, batch_size=batch_size, split="all", shuffle=False, prefetch=0,
                         size_factor=model.module.use_size_factor)
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
    feats, member = {}, np.zeros((n, 2), dtype=bool)
    for mod, names in ((keys.RNA, model.gene_names), (keys.ATAC, model.region_names)):
        if mod not in mdata.mod:
            continue
        a = mdata.mod[mod]
        rows = a.obs_names.get_indexer(mdata.obs_names)
        cols = _columns(a.var_names, names, f"MuData '{mod}'")
        feats[mod] = (a.X, rows, cols)
        member[:, keys.MASK_COLUMN[mod]] = rows >= 0
    m = _explicit_mask(mask, obs, n)
    return _memory_source(model, obs, feats, member if m is None else m, batch_size, inferred=m is None)


def _explicit_mask(mask, obs: pd.DataFrame, n: int) -> np.ndarray | None:
    """Rules 1-3 of the module docstring, or None when none applies."""
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != (n, 2) or m.dtype != bool:
            raise APIError(f"mask must be a boolean array of shape ({n}, 2), got {m.dtype} {m.shape}")
        return m
    if "mask_rna" in obs and "mask_atac" in obs:
        return np.stack([obs["mask_rna"].to_numpy(bool), obs["mask_atac"].to_numpy(bool)], axis=1)
    if "modality" in obs:
        values = obs["modality"].astype(str)
        bad = sorted(set(values) - set(_MODALITY_COLUMN))
        if bad:
            raise APIError(f"obs['modality'] has values {bad[:5]}; expected {list(_MODALITY_COLUMN)}")
        return np.array([_MODALITY_COLUMN[v] for v in values], dtype=bool).reshape(n, 2)
    return None


def _obs_values(obs: pd.DataFrame, key: str) -> pd.Series | None:
    """A top-level column, or (MuData) the per-modality columns 'rna:key' / 'atac:key' combined."""
    if key in obs:
        return obs[key]
    parts = [obs[f"{m}:{key}"] for m in keys.MODALITIES if f"{m}:{key}" in obs]
    if not parts:
        return None
    out = parts[0].astype(object)
    for p in parts[1:]:
        out = out.where(out.notna(), p.astype(object))
    return out


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
    sub = x[rows[take]] if take.any() else x[:0]
    sub = sub.tocsr() if sp.issparse(sub) else sp.csr_matrix(np.asarray(sub))
    if cols is not None:
        sub = sub[:, cols]
    nnz = np.zeros(len(rows), dtype=np.int64)
    nnz[take] = np.diff(sub.indptr)
    indptr = np.concatenate([[0], np.cumsum(nnz)])
    return sp.csr_matrix((sub.data.astype(np.float32), sub.indices, indptr), shape=(len(rows), n_cols))


def _torch_csr(x: sp.csr_matrix) -> torch.Tensor:
    return torch.sparse_csr_tensor(torch.from_numpy(x.indptr.astype(np.int64)),
                                   torch.from_numpy(x.indices.astype(np.int64)),
                                   torch.from_numpy(x.data.astype(np.float32)), size=x.shape,
                                   check_invariants=False)  # built by scipy: valid by construction


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
        cont.append(v.to_numpy(np.float32))
    cont = np.stack(cont, axis=1) if cont else np.zeros((n, 0), np.float32)
    mask = mask.copy()
    for mod in keys.MODALITIES:
        if mod not in feats:
            mask[:, keys.MASK_COLUMN[mod]] = False

    def chunk(lo: int, hi: int) -> dict:
        m = mask[lo:hi]
        out = {}
        for mod in keys.MODALITIES:
            if mod in feats:
                x, rows, cols = feats[mod]
                out[mod] = _rows(x, rows[lo:hi], cols, m[:, keys.MASK_COLUMN[mod]])
            else:
                out[mod] = sp.csr_matrix((hi - lo, width[mod]), dtype=np.float32)
        b = {mod: _torch_csr(out[mod]) for mod in keys.MODALITIES}
        b.update({keys.MASK: torch.from_numpy(m.copy()), keys.BATCH: torch.from_numpy(batch[lo:hi]),
                  keys.CAT_COVS: torch.from_numpy(cats[lo:hi]), keys.CONT_COVS: torch.from_numpy(cont[lo:hi]),
                  keys.INDEX: torch.arange(lo, hi, dtype=torch.int64)})
        if model.module.use_size_factor:  # as data.collate: the row total, 1 for an unmeasured modality
            tot = np.stack([np.asarray(out[mod].sum(axis=1)).ravel() for mod in keys.MODALITIES], axis=1)
            b[keys.SIZE_FACTOR] = torch.from_numpy(np.where(m, np.maximum(tot, 1.0), 1.0).astype(np.float32))
        return b, out

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
