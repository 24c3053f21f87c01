"""The optional UMAP picture of an embed output: one PNG, one panel per annotation (batch, modality, label).

``draw_umap(embed_output, png)`` reads only ``obsm/X_multivi`` and ``obs`` of the AnnData Zarr that the
embed job wrote (never the per-modality latents), draws a seeded random subsample when the output has
more than ``max_cells`` cells (UMAP of an atlas is neither readable nor affordable: scanpy's neighbour
graph + layout cost minutes per 100k cells on one core) and says so in the title, then runs
``scanpy.pp.neighbors(use_rep='X_multivi')`` + ``scanpy.tl.umap`` and colours the same layout by each
annotation that exists. Panels whose column is absent are skipped, not drawn empty.

Which obs columns are used: the batch and label keys recorded in the model's ``model.json`` (the embed
output's ``uns['multivi']['model']``), else ``batch`` / the first of ``label``, ``cell_type``; the
modality is the ``modality`` column if there is one, else derived from the store's ``mask_rna`` /
``mask_atac`` flags (paired / RNA only / ATAC only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from anndata.io import read_elem

from trainer.jobs.common import InferError

PANEL_INCHES, DPI = 5.0, 100  # one square panel = 500 x 500 px (+ legend room), tests rely on the width
MAX_LEGEND = 30  # categories listed in a legend; more (e.g. fine cell types) -> no legend, colours only


def category_colours(n: int) -> np.ndarray:
    """(n, 4) RGBA, distinct up to 102 categories: scanpy's palettes by size (tab20 repeated its colours
    from the 21st category on, so BMMC's pDC and B1 B looked alike)."""
    from matplotlib.colors import to_rgba
    from scanpy.plotting import palettes

    pal = palettes.default_20 if n <= 20 else palettes.default_28 if n <= 28 else palettes.default_102
    return np.array([to_rgba(pal[i % len(pal)]) for i in range(max(n, 1))])
PYNNDESCENT_FROM = 8192  # scanpy 1.11 switches from exact sklearn kNN to pynndescent at this many cells
MIN_CELLS = 3  # a kNN graph and a 2-D layout need at least this many points


def _keys_from_model(uns: dict) -> tuple[str | None, str | None]:
    """(batch_key, label_key) recorded by training in the model that wrote this embedding, if readable."""
    model = (uns.get("multivi") or {}).get("model")
    info = Path(str(model)) / "model.json" if model else None
    if info is None or not info.is_file():
        return None, None
    meta = json.loads(info.read_text())
    return meta.get("batch_key"), meta.get("label_key")


def _modality(obs: pd.DataFrame) -> pd.Series | None:
    if "modality" in obs:
        return obs["modality"].astype("category")
    if {"mask_rna", "mask_atac"} <= set(obs.columns):
        rna, atac = obs["mask_rna"].to_numpy(bool), obs["mask_atac"].to_numpy(bool)
        lab = np.where(rna & atac, "paired", np.where(rna, "RNA only", np.where(atac, "ATAC only", "none")))
        return pd.Series(pd.Categorical(lab), index=obs.index)
    return None


def panel_columns(obs: pd.DataFrame, uns: dict, batch_key: str | None = None,
                  label_key: str | None = None) -> dict[str, pd.Series]:
    """Panel title -> categorical colouring, for the annotations present in ``obs`` (in a fixed order)."""
    model_batch, model_label = _keys_from_model(uns)
    batch_key = batch_key or model_batch or "batch"
    label_key = label_key or model_label or next((k for k in ("label", "cell_type") if k in obs), None)
    panels: dict[str, pd.Series] = {}
    if batch_key in obs:
        panels[f"batch ({batch_key})"] = obs[batch_key].astype(str).astype("category")
    mod = _modality(obs)
    if mod is not None:
        panels["modality"] = mod
    if label_key is not None and label_key in obs:
        panels[f"label ({label_key})"] = obs[label_key].astype(str).astype("category")
    return panels


def _knn_transformer(n_obs: int, n_neighbors: int, seed: int):
    """scanpy's own default for large data (pynndescent, UMAP's settings), returning a ``csr_matrix``.

    Why: from 8,192 cells on, ``scanpy.pp.neighbors`` (1.11.5) uses pynndescent, whose 0.7 transformer
    returns a scipy ``csr_array``; scanpy then calls ``getnnz``, which scipy 1.17 sparse *arrays* no longer
    have (``AttributeError``). Same settings as scanpy's default (UMAP's ``n_trees`` / ``n_iters``).
    """
    import scipy.sparse as sp
    from pynndescent import PyNNDescentTransformer

    class _CsrMatrixNNDescent(PyNNDescentTransformer):
        def fit_transform(self, X, y=None, **fit_params):
            return sp.csr_matrix(super().fit_transform(X, y, **fit_params))

    return _CsrMatrixNNDescent(n_neighbors=n_neighbors, metric="euclidean", random_state=seed, n_jobs=1,
                               n_trees=min(64, 5 + round(n_obs ** 0.5 / 20.0)),
                               n_iters=max(5, round(np.log2(n_obs))))


def _read(embed_output: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    path = Path(embed_output)
    try:
        root = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise InferError(f"{path} is not an embed output (no Zarr group there)") from None
    if "obsm" not in root or "X_multivi" not in root["obsm"]:
        raise InferError(f"{path} has no obsm['X_multivi']: is it the output of job=embed?")
    if not root.attrs.get("mva_complete", False):
        raise InferError(f"{path} is not marked complete: finish the embed job first")
    z = root["obsm/X_multivi"]
    if z.ndim != 2:
        raise InferError(f"obsm['X_multivi'] has shape {z.shape}: a UMAP needs posterior means "
                         f"(give_mean=true or n_samples=1)")
    uns = read_elem(root["uns"]) if "uns" in root else {}
    return z, read_elem(root["obs"]), uns


def draw_umap(embed_output: str, png: str, max_cells: int = 100_000, seed: int = 0,
              n_neighbors: int = 15, batch_key: str | None = None, label_key: str | None = None) -> dict:
    """Draw the UMAP PNG; returns {png, n_cells, n_drawn, panels, title}."""
    import matplotlib

    matplotlib.use("Agg")  # headless: writing a file, never a window
    import anndata as ad
    import matplotlib.pyplot as plt
    import scanpy as sc

    if max_cells < MIN_CELLS:
        raise InferError(f"max_cells must be >= {MIN_CELLS}, got {max_cells}")
    z_arr, obs, uns = _read(embed_output)
    n = z_arr.shape[0]
    if n < MIN_CELLS:
        raise InferError(f"{embed_output} has {n} cells: a UMAP needs at least {MIN_CELLS}")
    title = f"UMAP of X_multivi, {n:,} cells"
    if n > max_cells:
        # sorted rows: one pass over the Zarr chunks in order instead of random chunk reads
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))
        z = z_arr.get_orthogonal_selection((rows, slice(None)))
        obs = obs.iloc[rows]
        title = f"UMAP of X_multivi, random subsample of {max_cells:,} of {n:,} cells (seed {seed})"
    else:
        z = z_arr[:]
    if not np.isfinite(z).all():
        raise InferError(f"{embed_output}: obsm['X_multivi'] holds non-finite values")
    panels = panel_columns(obs, uns, batch_key, label_key)
    if not panels:
        raise InferError(f"{embed_output}: obs has none of the batch / modality / label columns to colour by")

    adata = ad.AnnData(obs=pd.DataFrame(index=obs.index.astype(str)), obsm={"X_multivi": np.asarray(z, np.float32)})
    k = min(n_neighbors, adata.n_obs - 1)
    # below PYNNDESCENT_FROM cells scanpy's exact sklearn kNN works as is; from there on, its pynndescent
    # default is replaced by the same search returning a type scanpy can read (see _knn_transformer)
    transformer = _knn_transformer(adata.n_obs, k, seed) if adata.n_obs >= PYNNDESCENT_FROM else None
    sc.pp.neighbors(adata, use_rep="X_multivi", n_neighbors=k, transformer=transformer, random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    xy = adata.obsm["X_umap"]

    k = len(panels)
    fig, axes = plt.subplots(1, k, figsize=(PANEL_INCHES * k, PANEL_INCHES), dpi=DPI, squeeze=False)
    point = max(0.2, min(8.0, 30_000 / len(xy)))  # marker area: visible for few cells, no blobs for many
    order = np.random.default_rng(seed + 1).permutation(len(xy))  # no category painted last on top of all
    for ax, (name, col) in zip(axes[0], panels.items()):
        cats = list(col.cat.categories)
        codes = col.cat.codes.to_numpy()[order]
        colours = category_colours(len(cats))
        ax.scatter(xy[order, 0], xy[order, 1], c=colours[codes], s=point, linewidths=0, rasterized=True)
        if len(cats) <= MAX_LEGEND:
            handles = [plt.Line2D([], [], ls="", marker="o", color=colours[i], label=c) for i, c in enumerate(cats)]
            ax.legend(handles=handles, loc="best", fontsize=7, markerscale=1.0, frameon=False)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(png).with_name(Path(png).name + ".tmp.png")  # a killed save leaves no half picture under the name
    fig.savefig(tmp, dpi=DPI)
    tmp.replace(png)
    plt.close(fig)
    return {"png": str(png), "n_cells": int(n), "n_drawn": len(xy), "panels": list(panels), "title": title}
