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
order; missing or extra names are an error) and X must hold raw counts (non-negative integers: a
normalised or log1p X is refused, naming a cell). Cells are processed ``batch_size`` at a time: memory is one
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
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data.collate import to_device
from trainer import predict
from trainer.api_sources import APIError, source
from trainer.export import INFO, load_model
from trainer.jobs.common import InferError, batch_codes, resolve_model_dir, select_features

_MODALITY = {"joint": "joint", "expression": "rna", "rna": "rna", "accessibility": "atac", "atac": "atac"}
_OBSM = {"joint": "X_multivi", "rna": "X_multivi_expression", "atac": "X_multivi_accessibility"}


def load(path: str | os.PathLike, device: str | torch.device = "auto") -> Model:
    """A trained model from a run directory, an exported model directory or a scvi-tools MULTIVI directory.

    ``device``: "auto" (the default, as the reference's ``accelerator="auto"``) is the GPU where one is visible,
    else the CPU; or any torch device ("cpu", "cuda:1")."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise APIError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (a torch device), got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise APIError(f"device={device!r}: no CUDA GPU is visible here; use 'auto' or 'cpu'")
    p = Path(path)
    if (p / "model.pt").is_file() and not (p / INFO).is_file() and not (p / "trainer.pt").is_file():
        from trainer.scvi_import import import_from_scvi

        tmp = tempfile.mkdtemp(prefix="mva-import-")
        atexit.register(shutil.rmtree, tmp, True)  # the converted copy lives as long as this Python session
        p = import_from_scvi(p, Path(tmp) / "model")
    model_dir = resolve_model_dir(p, "path")
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
               batch_size: int = 1024, mask=None, as_anndata: bool = False, return_dist: bool = False):
        """Posterior means (cells, d), or samples: (cells, d) for one, (cells, n_samples, d) for several.

        ``return_dist``: the normal posterior instead, ``(means, variances)`` (cells, d) each, before an ``ln``
        softmax (the reference's ``return_dist=True``); as AnnData: obsm ``<key>_qz_m`` and ``<key>_qz_v``."""
        if modality not in _MODALITY:
            raise APIError(f"modality must be one of {list(_MODALITY)}, got {modality!r}")
        _check_samples(give_mean, n_samples, seed)
        mod = _MODALITY[modality]
        if return_dist:
            return self._posterior(data, mod, batch_size, mask, as_anndata)

        def fn(batch):
            if give_mean:
                return predict.latent(self.module, batch, mod)
            z = predict.latent(self.module, batch, mod, give_mean=False, n_samples=n_samples)
            return z[0] if n_samples == 1 else z.transpose(0, 1)

        tail = () if give_mean or n_samples == 1 else (n_samples,)
        src = source(self, data, mask, batch_size)
        out = self._collect(src, fn, (*tail, self.module.n_latent), seed, give_mean)
        if not as_anndata:
            return out
        import anndata as ad

        return ad.AnnData(obs=src.obs.copy(), obsm={_OBSM[mod]: out})

    def library_size_factors(self, data, batch_size: int = 1024, mask=None) -> dict[str, np.ndarray]:
        """Per-cell library factors of the encoders, the reference's ``get_library_size_factors``:
        ``expression`` the log-scale RNA library, ``accessibility`` the ATAC factor in (0, 1) (with
        ``use_size_factor`` models: log(size factor + 1e-6) and the raw ATAC size factor). (cells,) each."""
        src = source(self, data, mask, batch_size)

        def fn(batch):
            inf = predict.mean_pass(self.module, batch)
            return torch.cat([inf["lib_rna"].reshape(-1, 1), inf["lib_atac"].reshape(-1, 1)], 1)

        both = self._collect(src, fn, (2,), 0, True)
        return {"expression": both[:, 0].copy(), "accessibility": both[:, 1].copy()}

    def elbo(self, data, batch_size: int = 1024, mask=None, seed: int = 0) -> float:
        """The reference's ``get_elbo``: minus the mean over cells of reconstruction + KL + modality penalty
        (KL weight 1). Each cell's posterior draw is keyed by (seed, its row), as the trainer's validation
        draws it (``trainer.validation.cell_noise``): the same number every call."""
        return -float(self._scores(data, batch_size, mask, seed)[:, 2].mean())

    def reconstruction_error(self, data, batch_size: int = 1024, mask=None, seed: int = 0) -> dict[str, float]:
        """The reference's ``get_reconstruction_error``: the mean reconstruction loss of each modality over
        all cells (0 for a cell without that modality), posterior draws as in :meth:`elbo`."""
        scores = self._scores(data, batch_size, mask, seed)
        return {"reconstruction_loss_expression": float(scores[:, 0].mean()),
                "reconstruction_loss_accessibility": float(scores[:, 1].mean())}

    def _scores(self, data, batch_size: int, mask, seed: int) -> np.ndarray:
        """(cells, 3) float64: RNA and ATAC reconstruction losses and the per-cell negative ELBO."""
        from trainer.validation import score_cells

        _check_seed(seed)
        parts = []
        for _, _, batch in source(self, data, mask, batch_size).batches():
            t = score_cells(self.module, batch, self.device, seed)
            parts.append(torch.stack([t["recon_rna"], t["recon_atac"], t["neg_elbo"]], 1).cpu())
        if not parts:  # a mean over no cells: NaN and numpy's "Mean of empty slice", not a number
            raise APIError("the data has 0 cells: elbo and reconstruction_error are means over cells")
        return torch.cat(parts).numpy()

    def region_factors(self) -> np.ndarray:
        """sigmoid(region factors) (regions,), the reference's ``get_region_factors``."""
        probs = self.module.region_factor_probs()
        if probs is None:
            raise APIError("this model was trained with model.region_factors=false: it has no region factors")
        return probs.detach().to("cpu", torch.float32).numpy()

    def _posterior(self, data, mod: str, batch_size: int, mask, as_anndata: bool):
        d = self.module.n_latent
        src = source(self, data, mask, batch_size)
        # one pass: mean and variance side by side, split after
        both = self._collect(src, lambda batch: torch.cat(predict.posterior(self.module, batch, mod), -1), (2 * d,),
                             0, True)
        m, v = both[:, :d].copy(), both[:, d:].copy()
        if not as_anndata:
            return m, v
        import anndata as ad

        return ad.AnnData(obs=src.obs.copy(), obsm={f"{_OBSM[mod]}_qz_m": m, f"{_OBSM[mod]}_qz_v": v})

    def expression(self, data, transform_batch=None, library_size: float | str = 1.0,
                   genes: Sequence[str] | None = None, give_mean: bool = True, n_samples: int = 1, seed: int = 0,
                   batch_size: int = 1024, mask=None, as_anndata: bool = False):
        """Normalized expression (cells, genes): rho times ``library_size`` (a number or "observed")."""
        _check_samples(give_mean, n_samples, seed)
        library_size = _library_size(library_size)
        index, names = _select(genes, self.gene_names, "gene")
        codes = self._codes(transform_batch)

        def fn(batch):
            return predict.normalized_expression(self.module, batch, transform_batch=codes,
                                                 library_size=library_size, n_samples=n_samples,
                                                 use_z_mean=give_mean, gene_index=index)

        src = source(self, data, mask, batch_size)
        out = self._collect(src, fn, (len(names),), seed, give_mean)
        return _as_anndata(src, out, names) if as_anndata else out

    def accessibility(self, data, normalize_cells: bool = False, normalize_regions: bool = False,
                      regions: Sequence[str] | None = None, transform_batch=None, threshold: float | None = None,
                      give_mean: bool = True, n_samples: int = 1, seed: int = 0, batch_size: int = 1024,
                      mask=None, as_anndata: bool = False):
        """Accessibility probabilities (cells, regions); with ``threshold`` in (0, 1] a CSR matrix of the
        p >= threshold (0 keeps everything: dense, as the reference and the accessibility job)."""
        _check_samples(give_mean, n_samples, seed)
        if isinstance(threshold, np.generic) and np.ndim(threshold) == 0:
            threshold = threshold.item()
        # a bool is refused as the job refuses it: True was 1.0, an all-zero matrix without a word
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0 <= threshold <= 1):
            raise APIError(f"threshold must be a number in [0, 1] or None, got {threshold!r}")
        if normalize_regions and self.module.region_factors is None:
            raise APIError("normalize_regions=True needs a model trained with region_factors=True")
        index, names = _select(regions, self.region_names, "region")
        codes = self._codes(transform_batch)

        def fn(batch):
            return predict.normalized_accessibility(self.module, batch, transform_batch=codes,
                                                    normalize_cells=normalize_cells,
                                                    normalize_regions=normalize_regions, n_samples=n_samples,
                                                    use_z_mean=give_mean, region_index=index)

        src = source(self, data, mask, batch_size)
        out = self._collect(src, fn, (len(names),), seed, give_mean, sparse_threshold=threshold or None)
        return _as_anndata(src, out, names) if as_anndata else out

    # ------------------------------------------------------------------------------ internals
    def _codes(self, transform_batch) -> list[int] | None:
        try:  # the jobs' rule: batch labels of the model or integer codes, a list is averaged
            return batch_codes(transform_batch, self.batch_categories, self.module.n_batch)
        except InferError as exc:
            raise APIError(str(exc)) from None

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


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_seed(seed) -> None:
    # the jobs' bound (InferConfig): draws seed torch with seed * 1_000_003 + chunk, which must stay < 2**64
    if not _is_int(seed) or not 0 <= seed < 2**44:
        raise APIError(f"seed must be an integer in [0, 2**44), got {seed!r}")


def _check_samples(give_mean: bool, n_samples: int, seed) -> None:
    if not _is_int(n_samples) or n_samples < 1:
        raise APIError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    _check_seed(seed)
    if give_mean and n_samples != 1:
        raise APIError("n_samples > 1 draws posterior samples: pass give_mean=False")


def _library_size(value) -> float | str | None:
    """The expression job's rule: a positive finite number or "observed". numpy numbers count as numbers
    (np.float32 was refused by trainer.predict), and inf is refused as the job refuses it (it gave all inf)."""
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()
    if value is None or (isinstance(value, str) and value == "observed"):
        return value  # None: rho itself, as 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise APIError(f"library_size must be a positive finite number or 'observed', got {value!r}")
    return float(value)


def _select(wanted, names: list[str], what: str) -> tuple[list[int] | None, list[str]]:
    if wanted is not None and not isinstance(wanted, str):
        wanted = list(wanted) if isinstance(wanted, Iterable) else wanted  # a generator is read once
        if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
            raise APIError(f"the {what}s must be a name or a list of names (strings), got {wanted!r}"[:300])
    try:  # the jobs' rule: names in the given order, unknown or repeated names refused
        return select_features([wanted] if isinstance(wanted, str) else wanted, names, what)
    except InferError as exc:
        raise APIError(str(exc)) from None


def _as_anndata(src, out, names: list[str]):
    import anndata as ad

    return ad.AnnData(X=out, obs=src.obs.copy(), var=pd.DataFrame(index=pd.Index(names, dtype=object)))
