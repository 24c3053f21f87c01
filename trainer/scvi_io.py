"""Export to scvi-tools 1.5.1 ``MULTIVI``: our models and stores in the form scvi-tools loads.

* ``export_to_scvi(model_dir, out_dir)`` writes a directory that ``scvi.model.MULTIVI.load(out_dir,
  adata=mdata)`` accepts, so a model trained here at scale can be analysed in scvi-tools.
* ``store_to_mudata(store)`` builds that ``mdata`` in memory from a (small) store.
* ``scvi_model(module, info, mdata)`` is a ``MULTIVI`` holding our weights, in memory.

The other direction, ``import_from_scvi`` (a trained scvi-tools MULTIVI directory -> our exported model
format), is ``trainer/scvi_import.py``; it shares this module's ``ScviIOError``, ``SCVI_FILE``, option names
and output-directory rules (``check_replaceable``).

Layout choice: the **MuData** layout (``MULTIVI.setup_mudata`` with modalities ``rna`` and ``atac``,
batch and covariates in the top-level ``mdata.obs``). scvi-tools 1.4+ no longer supports the single
genes-then-peaks AnnData: ``MULTIVI.setup_anndata`` only warns and registers nothing, so a model saved
with that registry could not be loaded. The MuData is fully paired (every cell in both modalities) and a
missing modality is an all-zero row, because that is how the reference detects missing modalities
(spec Part B 1.4); our store has exactly those empty rows, plus the explicit ``mask_rna``/``mask_atac``
columns that scvi-tools ignores.

The registry is produced by scvi-tools itself: we run ``setup_mudata`` on a small skeleton MuData with the
model's features and categories, build ``MULTIVI`` with the model's options, load our weights through the
name mapping of ``trainer/reference.py`` and call scvi's own ``save``. So the file format is whatever the
installed scvi-tools writes, never a hand-made imitation. The registry's cell counts are the skeleton's
(scvi-tools recomputes them from the ``adata`` given to ``load``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data import keys
from data.collate import atac_library_max as _store_atac_max
from data.collate import size_factor_rows
from trainer.export import (
    INFO,
    SIZE_FACTOR_COLUMNS,
    TRAINING_STORE,
    WEIGHTS,
    is_atac_library_max,
    load_model,
    training_atac_library_max,
)
from trainer.reference import reference_state_from_ours

SCVI_FILE = "model.pt"
# model.json keys that travel in multivi_atlas.json[CARRIED] through to_scvi -> from_scvi
CARRIED = "model_json"
CARRIED_KEYS = ("label_key", "label_categories", "config", "weights", "epochs", "steps", "validation", "best")
MODALITY_NAMES = {"rna_layer": keys.RNA, "atac_layer": keys.ATAC}
# MULTIVI constructor options with the same name and meaning as our MultiVAE options
_OPTIONS = ("modality_weights", "modality_penalty", "n_hidden", "n_latent", "n_layers_encoder",
            "n_layers_decoder", "dropout_rate", "region_factors", "gene_likelihood", "dispersion",
            "use_batch_norm", "use_layer_norm", "latent_distribution", "deeply_inject_covariates",
            "encode_covariates")


class ScviIOError(ValueError):
    """A model directory that cannot be converted (or a checkpoint refused as unsafe); one-line message."""


# --------------------------------------------------------------------------- our store -> scvi data
def store_to_mudata(store, cells: np.ndarray | None = None, atac_library_max: float | None = None):
    """The MuData that ``MULTIVI.load(dir, adata=...)`` expects, for ``cells`` (default all) of a store:
    positions in the order wanted, or a boolean mask over the store's cells. ``atac_library_max``: the ATAC
    size factors' denominator (a size-factor model's ``model.json`` ``training_store`` value; default: this
    store's largest ATAC total, which is the model's own on its training store).

    In memory (cells x features, sparse): meant for small stores and subsets. Fully paired, missing
    modalities as empty rows; top-level obs = the store's obs (batch, covariates, masks) plus the size
    factor columns. Warns if a measured cell has an all-zero row: scvi-tools will treat it as missing.
    """
    import anndata as ad
    import mudata as md

    from data.cell_table import as_store

    if atac_library_max is not None and not is_atac_library_max(atac_library_max):
        # the rule model.json's value follows (a total count of at least one): 0 gave every cell factor 1,
        # a negative value 1e-6, NaN NaN, which scvi-tools then used as given
        raise ScviIOError(f"atac_library_max must be a finite number >= 1 (a model.json training_store value: "
                          f"the largest ATAC total of the training store), got {atac_library_max!r}")
    st = as_store(store)
    m = st.meta
    obs = st.read_obs()
    mats = {mod: sp.vstack([st.read_rows(mod, s, 0, m.shard_offsets[s + 1] - m.shard_offsets[s])
                            for s in range(m.n_shards)], format="csr").astype(np.float32)
            for mod in keys.MODALITIES}
    totals = np.stack([np.asarray(mats[mod].sum(axis=1)).ravel() for mod in keys.MODALITIES], axis=1)
    mask = np.stack([obs[f"mask_{mod}"].to_numpy(bool) for mod in keys.MODALITIES], axis=1)
    atac_max = (atac_library_max if atac_library_max is not None
                else _store_atac_max(totals[:, 1], mask[:, 1]))  # over the whole store, as the loader's
    if cells is not None:
        cells = _cell_positions(cells, m.n_cells)
        obs = obs.iloc[cells]
        mats = {k: v[cells] for k, v in mats.items()}
        totals, mask = totals[cells], mask[cells]
    obs = obs.copy()
    # setup_mudata writes this column itself, but scvi-tools' registry *transfer* (model.get_...(mdata) on
    # a MuData it has not seen) expects it already present and fails without it
    obs["_indices"] = np.arange(len(obs), dtype=np.int64)
    sf = size_factor_rows(totals, mask, atac_max)
    for j, (mod, col) in enumerate(zip(keys.MODALITIES, SIZE_FACTOR_COLUMNS, strict=True)):
        obs[col] = sf[:, j]
        n_bad = int((mask[:, j] & (totals[:, j] == 0)).sum())
        if n_bad:
            warnings.warn(f"{n_bad} cells measured in {mod} have an all-zero row: scvi-tools will treat that "
                          f"modality as missing for them (our model uses the explicit mask)", stacklevel=2)
    names = {keys.RNA: m.gene_names, keys.ATAC: m.region_names}
    mods = {mod: ad.AnnData(mats[mod], obs=pd.DataFrame(index=obs.index.copy()),
                            var=pd.DataFrame(index=pd.Index(names[mod], dtype=object)))
            for mod in keys.MODALITIES}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        mdata = md.MuData(mods)
    mdata.obs = obs
    return mdata


def _cell_positions(cells, n: int) -> np.ndarray:
    """``cells`` (positions, or a boolean mask of all n cells) -> int64 positions. A cast alone read a boolean
    mask as the positions 0/1 (n copies of two cells), truncated floats and wrapped negative positions."""
    c = np.asarray(cells)
    if c.dtype == bool:
        if c.shape != (n,):
            raise ScviIOError(f"cells= as a boolean mask needs one value per store cell ({n}), got a boolean mask "
                              f"of {c.size} values")
        return np.flatnonzero(c)
    if c.ndim != 1 or (c.size and not np.issubdtype(c.dtype, np.integer)):
        raise ScviIOError(f"cells= must be integer positions or a boolean mask, got {c.dtype} of shape {c.shape}")
    c = c.astype(np.int64)
    if c.size and (c.min() < 0 or c.max() >= n):
        raise ScviIOError(f"cells= positions must be in [0, {n}): position {int(c[(c < 0) | (c >= n)][0])} is out "
                          f"of range for a store of {n} cells")
    if len(np.unique(c)) != len(c):
        raise ScviIOError("cells= lists a cell more than once (a MuData needs unique cell ids)")
    return c


def _skeleton_mudata(info: dict, n_obs: int):
    """A tiny MuData with the model's features and categories (each category present), for setup_mudata."""
    import anndata as ad
    import mudata as md

    n = max(n_obs, 1)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n)])
    cats = {info["batch_key"]: info["batch_categories"]} if info["batch_categories"] else {}
    cats.update(info["cat_cov_categories"])
    for key, values in cats.items():
        obs[key] = pd.Categorical.from_codes(np.arange(n) % len(values), categories=list(values))
    for key in info["cont_cov_keys"]:
        obs[key] = np.zeros(n, dtype=np.float32)
    for col in SIZE_FACTOR_COLUMNS:
        obs[col] = np.ones(n, dtype=np.float32)
    mods = {mod: ad.AnnData(sp.csr_matrix((n, len(names)), dtype=np.float32), obs=pd.DataFrame(index=obs.index),
                            var=pd.DataFrame(index=pd.Index(names, dtype=object)))
            for mod, names in ((keys.RNA, info["gene_names"]), (keys.ATAC, info["region_names"]))}
    mdata = md.MuData(mods)
    mdata.obs = obs
    return mdata


def setup_kwargs(info: dict, use_size_factor: bool) -> dict:
    """``MULTIVI.setup_mudata`` arguments for data laid out as ``store_to_mudata`` builds it."""
    return {"batch_key": info["batch_key"] if info["batch_categories"] else None,
            "categorical_covariate_keys": list(info["cat_cov_keys"]) or None,
            "continuous_covariate_keys": list(info["cont_cov_keys"]) or None,
            "size_factor_key": list(SIZE_FACTOR_COLUMNS) if use_size_factor else None,
            "modalities": {k: v for k, v in MODALITY_NAMES.items()}}


def scvi_model(module, info: dict, mdata):
    """A scvi-tools ``MULTIVI`` on ``mdata`` (laid out as ``store_to_mudata`` builds it) holding our
    module's weights (``trainer.reference`` name mapping), in eval mode, marked trained."""
    import scvi

    opts = {o: getattr(module, o) for o in _OPTIONS}
    opts["region_factors"] = module.region_factors is not None
    scvi.model.MULTIVI.setup_mudata(mdata, **setup_kwargs(info, module.use_size_factor))
    model = scvi.model.MULTIVI(mdata, n_genes=module.n_genes, n_regions=module.n_regions, **opts)
    model.module.load_state_dict(reference_state_from_ours(module.state_dict(), model.module.state_dict()))
    model.module.eval()
    model.is_trained_ = True
    return model


# the files each direction writes: overwrite replaces only a directory holding nothing else (a mistyped
# output naming a store, a run directory or the model being exported must never be deleted)
PRODUCTS = {"to_scvi": frozenset({SCVI_FILE, "multivi_atlas.json"}), "from_scvi": frozenset({WEIGHTS, INFO})}


def check_replaceable(out_dir: str | os.PathLike, direction: str, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Refuse an existing ``out_dir`` unless ``overwrite`` and it holds only ``direction``'s own files."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not overwrite:
        raise ScviIOError(f"{out} already exists: pass {flag} to replace it")
    if not (out.is_dir() and {p.name for p in out.iterdir()} <= PRODUCTS[direction]):
        raise ScviIOError(f"{out} exists and is not an export {direction} output (only {sorted(PRODUCTS[direction])}): "
                          f"{flag} only replaces those; remove it yourself or choose another output")


def _atomic_dir(out_dir: str | os.PathLike, overwrite: bool, direction: str) -> tuple[Path, Path]:
    final = Path(out_dir)
    check_replaceable(final, direction, overwrite)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    return final, tmp


def _publish(tmp: Path, final: Path) -> Path:
    """Rename the finished temporary directory to its final name (the old output goes only now)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def mudata_call(info: dict) -> str:
    """How to build the MuData for this model (its model.json): a size-factor model's ATAC factors need its
    training scale."""
    trained = training_atac_library_max(info) if info["model_args"].get("use_size_factor") else None
    return "store_to_mudata(store)" if trained is None else f"store_to_mudata(store, atac_library_max={trained!r})"


def export_to_scvi(model_dir: str | os.PathLike, out_dir: str | os.PathLike, store=None,
                   overwrite: bool = False) -> Path:
    """Write ``out_dir`` (scvi-tools' own ``model.pt``) for ``MULTIVI.load(out_dir, adata=mdata)``.

    ``store`` (optional) is checked against the model (features, categories) so a mismatch shows here.
    """
    import scvi

    from trainer.jobs.common import open_checked_store, resolve_model_dir

    src = resolve_model_dir(model_dir)
    module, info = load_model(src)
    if module.rna_library != "deterministic":
        raise ScviIOError(f"{src} was trained with model.rna_library={module.rna_library}: scvi-tools' MULTIVI has "
                          "only the deterministic library network, so no MULTIVI holds this model")
    if store is not None:
        open_checked_store(store, info)
    n_obs = module.mod_weights.shape[0] if module.modality_weights == "cell" else \
        max(len(info["batch_categories"]), *[len(v) for v in info["cat_cov_categories"].values()], 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "category has fewer than 3 cells" etc. concern the skeleton only
        model = scvi_model(module, info, _skeleton_mudata(info, n_obs))
    final, tmp = _atomic_dir(out_dir, overwrite, "to_scvi")
    try:
        model.save(str(tmp), save_anndata=False, overwrite=True)
        (tmp / "multivi_atlas.json").write_text(json.dumps({
            "exported_from": str(src.resolve()), "scvi_tools_version": scvi.__version__, "layout": "mudata",
            "setup_mudata": setup_kwargs(info, module.use_size_factor),
            # scvi's registry holds the skeleton's cell count; the training cells' count travels here, and
            # what inference needs of the training store (from_scvi brings both back)
            "n_obs": int(info["model_args"].get("n_obs", 0)), TRAINING_STORE: info.get(TRAINING_STORE) or {},
            # what scvi's registry has no place for (labels, how the weights were trained): from_scvi restores it
            CARRIED: {k: info[k] for k in CARRIED_KEYS if k in info},
            "note": "load with scvi.model.MULTIVI.load(dir, adata=mdata); build mdata with "
                    f"trainer.scvi_io.{mudata_call(info)}"}, indent=1))
        return _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
