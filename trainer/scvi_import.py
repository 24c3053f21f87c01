"""Import from scvi-tools 1.5.1 ``MULTIVI``: a trained scvi-tools MULTIVI directory -> our model format.

``import_from_scvi(scvi_dir, out_dir)`` turns it into our exported model format (``trainer/export.py``) so
every ``mva-infer`` job and ``trainer.api`` run on it. The other direction (export, ``store_to_mudata``) and
what both share (``ScviIOError``, the output-directory rules) are ``trainer/scvi_io.py``.

Importing never runs code from the file: scvi's ``model.pt`` is a pickle, loaded with
``torch.load(weights_only=True)`` and the explicit allowlist ``SAFE_GLOBALS`` (numpy array reconstruction
and plain builtins). The pandas DataFrames of the training history are replaced by an inert placeholder
(``Opaque``) that ignores its state; anything else outside the list is refused with ``ScviIOError``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from data import keys
from trainer.export import INFO, TRAINING_STORE, WEIGHTS, weights_of
from trainer.module import MultiVAE
from trainer.reference import ours_state_from_reference, to_reference_layout
from trainer.scvi_io import _OPTIONS, CARRIED, CARRIED_KEYS, SCVI_FILE, ScviIOError, _atomic_dir, _publish


# --------------------------------------------------------------------------- safe checkpoint reading
class Opaque:
    """Inert stand-in for pandas objects (the training history): keeps nothing, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _opaque(*args: Any, **kwargs: Any) -> Opaque:
    return Opaque()


def _plain_dict(*args: Any) -> dict:
    # defaultdict -> dict: the unpickler fills only plain dicts, and the default factory is not needed
    return {}


_NUMPY_DTYPES = ("O", "?", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "U", "S")
SAFE_GLOBALS: list = [
    np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype,
    *[type(np.dtype(c)) for c in _NUMPY_DTYPES],
    dict, bytes, slice,
    (_plain_dict, "collections.defaultdict"),
    *[(Opaque, name) for name in ("pandas.core.frame.DataFrame", "pandas.core.series.Series",
                                  "pandas.core.internals.managers.BlockManager",
                                  "pandas.core.internals.managers.SingleBlockManager",
                                  "pandas.core.indexes.base.Index", "pandas.core.indexes.range.RangeIndex")],
    *[(_opaque, name) for name in ("pandas.core.indexes.base._new_Index", "pandas._libs.internals._unpickle_block")],
]


def read_scvi_checkpoint(path: str | os.PathLike) -> dict:
    """scvi-tools' ``model.pt`` -> {model_state_dict, var_names, attr_dict}, without running code from it."""
    p = Path(path)
    if not p.is_file():
        raise ScviIOError(f"{p} does not exist (a scvi-tools model directory holds {SCVI_FILE})")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message = advice paragraphs around the one line that says what was refused
        boiler = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
        lines = [ln.strip() for ln in str(exc).splitlines()
                 if ln.strip() and not ln.strip().startswith(boiler) and "weights_only" not in ln]
        reason = " ".join(ln.replace("WeightsUnpickler error:", "").strip() for ln in lines)[:300]
        if not any(s in reason.lower() for s in ("global", "can only build", "allowlist")):
            raise ScviIOError(f"{p} is not a readable torch checkpoint ({reason})") from None
        raise ScviIOError(f"refused to load {p}: it needs a Python object outside the allowlist of safe types "
                          f"(tensors, numpy arrays, plain containers), so it is not a plain scvi-tools model "
                          f"and could run code [{reason}]") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError) as exc:  # damaged zip, mismatched arrays
        raise ScviIOError(f"{p} is not a readable torch checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ck, dict) or not {"model_state_dict", "attr_dict"} <= set(ck):
        raise ScviIOError(f"{p} is not a scvi-tools model file (expected model_state_dict and attr_dict)")
    return ck


# --------------------------------------------------------------------------- scvi -> our format
def _names(values) -> list[str]:
    return [str(v) for v in np.asarray(values, dtype=object).tolist()]


def _model_spec(ck: dict) -> dict:
    """Our model.json (minus weights) from scvi's registry and init params; refuses what we cannot run."""
    attr = ck["attr_dict"]
    registry, init = attr.get("registry_"), attr.get("init_params_")
    if not isinstance(registry, dict) or not isinstance(init, dict):
        raise ScviIOError("the checkpoint has no registry_/init_params_ (not a scvi-tools model save)")
    if registry.get("model_name", "MULTIVI") != "MULTIVI":
        raise ScviIOError(f"this is a scvi-tools {registry.get('model_name')} model, not MULTIVI")
    fields = registry.get("field_registries", {})
    if fields.get("proteins", {}).get("data_registry"):
        raise ScviIOError("the model has a protein modality, which this project's model does not have")
    params = dict(init.get("non_kwargs", init))
    extra = {k: v for d in init.get("kwargs", {}).values() if isinstance(d, dict) for k, v in d.items()}
    if extra:
        raise ScviIOError(f"unsupported MULTIVAE keyword arguments {sorted(extra)}")
    genes = _names(fields["X"]["state_registry"]["column_names"])
    if "atac" in fields and fields["atac"].get("data_registry"):
        regions = _names(fields["atac"]["state_registry"]["column_names"])
    else:  # legacy (< 1.4) setup_anndata: one genes-then-peaks matrix, split at n_genes
        n_g = int(params["n_genes"])
        genes, regions = genes[:n_g], genes[n_g:]
    sd = ck["model_state_dict"]
    batch = fields.get("batch", {}).get("state_registry", {})
    cats = fields.get("extra_categorical_covs", {}).get("state_registry", {})
    cat_keys = list(cats.get("field_keys") or [])
    cat_categories = {k: _names(cats["mappings"][k]) for k in cat_keys}
    cont_keys = _names(fields.get("extra_continuous_covs", {}).get("state_registry", {}).get("columns", []))
    # sizes from the weights themselves (init params may say None = "reference default")
    n_hidden, n_latent = (int(s) for s in (sd["z_encoder_expression.mean_encoder.weight"].shape[1],
                                            sd["z_encoder_expression.mean_encoder.weight"].shape[0]))
    modality_weights = params.get("modality_weights", "equal")
    opts = {o: params[o] for o in _OPTIONS if o in params}
    size_factor = fields.get("size_factor", {})
    opts.update(n_hidden=n_hidden, n_latent=n_latent, use_size_factor=bool(size_factor.get("data_registry")))
    model_args = {"n_genes": len(genes), "n_regions": len(regions),
                  "n_batch": max(1, len(batch.get("categorical_mapping", []))),
                  "n_cats_per_cov": [len(cat_categories[k]) for k in cat_keys], "n_continuous_cov": len(cont_keys),
                  "n_obs": int(sd["mod_weights"].shape[0]) if modality_weights == "cell"
                  else int(fields["X"]["state_registry"].get("n_obs", 0)), **opts}
    return {"format": keys.MODEL_FORMAT, "version": 1, "model_args": model_args, "config": None,
            "gene_names": genes, "region_names": regions,
            "batch_key": str(batch.get("original_key", "batch")),
            "batch_categories": _names(batch.get("categorical_mapping", [])),
            "cat_cov_keys": cat_keys, "cat_cov_categories": cat_categories, "cont_cov_keys": cont_keys,
            "label_key": None, "label_categories": [],
            # the obs columns [RNA, ATAC] the reference read its size factors from (trainer.api reads them too)
            **({"size_factor_keys": _names(size_factor.get("state_registry", {}).get("columns", []))}
               if opts["use_size_factor"] else {})}


def _carried(saved) -> dict:
    """The model.json keys our to_scvi export kept (labels, training provenance), those of the expected kinds."""
    if not isinstance(saved, dict):
        return {}
    out = {k: v for k, v in saved.items() if k in CARRIED_KEYS}
    key, cats = out.get("label_key"), out.get("label_categories", [])
    if not (key is None or isinstance(key, str)) or not (isinstance(cats, list) and all(isinstance(c, str) for c in cats)):
        for k in ("label_key", "label_categories"):  # a damaged note: the registry's (none)
            out.pop(k, None)
    return out


_REFERENCE_ONLY = ("z_encoder_protein.", "z_decoder_pro.", "background_pro_", "py_r")


def import_from_scvi(scvi_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """A trained scvi-tools MULTIVI directory -> our exported model (model.safetensors + model.json)."""
    src = Path(scvi_dir)
    ck = read_scvi_checkpoint(src / SCVI_FILE if src.is_dir() else src)
    try:
        info = _model_spec(ck)
    except ScviIOError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # a registry or weight missing what a MULTIVI save always has: one line, not a traceback
        raise ScviIOError(f"{src} is not a complete scvi-tools MULTIVI save ({type(exc).__name__}: {exc})") from None
    ours_export = src / "multivi_atlas.json" if src.is_dir() else None
    if ours_export is not None and ours_export.is_file():
        # our own export: its registry counted a few skeleton cells (n_obs 3), the model trained on more; and the
        # training store's facts (cells, ATAC size-factor scale) come back with it
        try:
            note = json.loads(ours_export.read_text())
            if info["model_args"].get("modality_weights") != "cell":
                info["model_args"]["n_obs"] = int(note.get("n_obs", info["model_args"]["n_obs"]))
            if isinstance(note.get(TRAINING_STORE), dict) and note[TRAINING_STORE]:
                info[TRAINING_STORE] = note[TRAINING_STORE]
            info.update(_carried(note.get(CARRIED)))
        except (ValueError, TypeError, AttributeError):
            pass  # a damaged note changes nothing the weights need
    ref = {k: v for k, v in ck["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    try:
        module = MultiVAE(**info["model_args"])
        ours = ours_state_from_reference(ref, module.state_dict())
        module.load_state_dict(ours)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ScviIOError(f"the scvi-tools weights do not fit the model its registry describes: "
                          f"{str(exc).splitlines()[0][:300]}") from None
    used = set(to_reference_layout(ours))
    # the reference always builds its per-cell dispersion head (only dispersion="gene-cell" uses it), its
    # zero-inflation head (only zinb uses it), its px_r (poisson uses none) and its library encoders (size
    # factors replace them): we build only what is used
    # (poisson has no dispersion: no px_r head here even for gene-cell, whose round trip this refused)
    idle = _REFERENCE_ONLY + (() if module.px_r_head is not None else ("z_decoder_expression.px_r_decoder.",))
    idle += (() if module.px_dropout is not None else ("z_decoder_expression.px_dropout_decoder.",))
    idle += (() if module.px_r is not None or module.dispersion == "gene-cell" else ("px_r",))
    idle += ("l_encoder_expression.", "l_encoder_accessibility.") if module.use_size_factor else ()
    unused = [k for k, v in ref.items() if k not in used and v.numel() and not k.startswith(idle)]
    if unused:  # a weight we would silently drop means the model is not the one we rebuild
        raise ScviIOError(f"{len(unused)} scvi-tools weights have no counterpart here (first: {unused[:3]})")
    info["imported_from"] = {"scvi_dir": str(src.resolve()),
                             "scvi_version": str(ck["attr_dict"]["registry_"].get("scvi_version", "?"))}
    final, tmp = _atomic_dir(out_dir, overwrite, "from_scvi")
    try:
        tmp.mkdir(parents=True)
        save_file(weights_of(module), str(tmp / WEIGHTS))
        (tmp / INFO).write_text(json.dumps(info, indent=1))
        return _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
