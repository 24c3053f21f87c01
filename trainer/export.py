"""The portable final model: ``model.safetensors`` (weights) + ``model.json`` (constructor arguments,
the resolved training config, feature names and categories). No pickle anywhere, so inference jobs
(and other tools) load it without trusting code in the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data import keys
from data.store import StoreError
from trainer.config import TrainConfig
from trainer.module import MultiVAE

WEIGHTS, INFO = keys.MODEL_WEIGHTS, keys.MODEL_INFO
# entries of model.json that say which data the model applies to
_INFO_KEYS = ("gene_names", "region_names", "batch_key", "batch_categories", "cat_cov_keys", "cat_cov_categories",
              "cont_cov_keys")
# model.json's facts of the training store (written by trainer/loop.py; absent in models exported before):
# ``cells_fingerprint`` (data.cell_table.cells_fingerprint: its cells in their order) and ``atac_library_max``
# (the denominator of the ATAC size factor, data.collate.size_factor_rows: a fixed scale of the model, not
# the largest total of whichever cells inference is given)
TRAINING_STORE = "training_store"
# one id per export, in model.json and in model.safetensors' header: the two files are renamed into place one
# after the other, so a kill between the renames (or a hand copy of one file) pairs weights with another export's
# description; the ids tell load_model so (a file without one, e.g. exported before it: not checked). The id is a
# digest of the weights, not a random one: re-exporting the same weights (a finished run's command rerun, a Slurm
# requeue) writes the same files again, and a query run's record of its reference still matches.
EXPORT_ID = "export_id"


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order (32 hex digits kept)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer: no copy of the bytes
    return h.hexdigest()[:32]


def is_atac_library_max(value: Any) -> bool:
    """A usable ATAC size-factor denominator: a finite number >= 1 (the largest ATAC total of a store)."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and math.isfinite(value) \
        and value >= 1


def training_atac_library_max(info: dict[str, Any]) -> float | None:
    """The training store's ATAC size factor denominator, or None (a model exported before it was kept)."""
    value = (info.get(TRAINING_STORE) or {}).get("atac_library_max")
    return None if value is None else float(value)


# obs columns holding the size factors when a model uses them (data.collate.size_factor_rows, spec gotcha 21):
# the names trainer.scvi_io writes for our models
SIZE_FACTOR_COLUMNS = ("_mva_size_factor_rna", "_mva_size_factor_atac")


def imported_size_factor_columns(info: dict[str, Any]) -> list[str]:
    """The obs columns an imported scvi-tools model read its size factors from (its size_factor_key), when
    they are not ours: their values are whatever its user computed, which no formula here reproduces.
    [] for our own models and for models without size factors."""
    cols = list(info.get("size_factor_keys") or [])
    return [] if not info.get("model_args", {}).get("use_size_factor") or cols == list(SIZE_FACTOR_COLUMNS) \
        else cols


class ModelFileError(ValueError):
    """An exported model whose files are malformed, tampered with, or disagree with each other."""


def model_args(meta, cfg: TrainConfig) -> dict[str, Any]:
    """MultiVAE constructor arguments: data sizes from the store, options from the config."""
    return {"n_genes": meta.n_genes, "n_regions": meta.n_regions, "n_batch": max(1, meta.n_batch),
            "n_cats_per_cov": list(meta.n_cats_per_cov), "n_continuous_cov": len(meta.cont_cov_keys),
            "n_obs": meta.n_cells, **asdict(cfg.model)}


def build_module(meta, cfg: TrainConfig) -> MultiVAE:
    if meta.n_genes < 1 or meta.n_regions < 1:  # e.g. built from an RNA-only input: MultiVAE refuses it
        raise StoreError(f"store {cfg.data.store} has {meta.n_genes} genes and {meta.n_regions} regions: MultiVI "
                         "needs both modalities' features (build the store from inputs that measure both)")
    return MultiVAE(**model_args(meta, cfg))


def weights_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # contiguous CPU fp32 copies: safetensors refuses shared/non-contiguous storage
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in module.state_dict().items()}


def export_model(weights: dict[str, torch.Tensor], meta, cfg: TrainConfig, out_dir: str | Path,
                 extra: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # both files under temporary names first, renamed only when both are complete: writing them in place, a
    # kill between the two (a resumed run re-exporting) left new weights described by the old model.json
    tmp_weights, tmp_info = out / f".{WEIGHTS}.tmp", out / f".{INFO}.tmp"
    export_id = weights_digest(weights)
    save_file(weights, str(tmp_weights), metadata={EXPORT_ID: export_id})
    info = {
        "format": keys.MODEL_FORMAT, "version": 1, EXPORT_ID: export_id,
        "model_args": model_args(meta, cfg),
        "config": asdict(cfg),
        "gene_names": list(meta.gene_names), "region_names": list(meta.region_names),
        "batch_key": meta.batch_key, "batch_categories": list(meta.batch_categories),
        "cat_cov_keys": list(meta.cat_cov_keys),
        "cat_cov_categories": {k: list(v) for k, v in meta.cat_cov_categories.items()},
        "cont_cov_keys": list(meta.cont_cov_keys),
        "label_key": meta.label_key, "label_categories": list(meta.label_categories),
        **(extra or {}),
    }
    tmp_info.write_text(json.dumps(info, indent=1))
    os.replace(tmp_weights, out / WEIGHTS)
    os.replace(tmp_info, out / INFO)
    return out


def _check_training_store(facts, where: Path) -> None:
    """``training_store`` is optional (models exported before it), but what is there must be usable: a hand-edited
    value became a ValueError traceback at inference."""
    if facts is None:
        return
    ok = isinstance(facts, dict) and isinstance(facts.get("cells_fingerprint", ""), str)
    if not ok or not is_atac_library_max(facts.get("atac_library_max", 1.0)):
        raise ModelFileError(f"{where}: training_store must hold a cells_fingerprint (text) and an atac_library_max "
                             f"(a finite number >= 1), got {facts!r}")


def _check_pair(info_id: Any, weights_id: str | None, d: Path) -> None:
    """Refuse weights and a description written by two different exports (see EXPORT_ID). Checked only where both
    files hold an id: models exported before it, scvi-tools imports and weights another tool wrote (e.g. cast to
    bf16) hold none, and the kill between the renames leaves two ids."""
    if info_id is None or weights_id is None:
        return
    if info_id != weights_id:
        raise ModelFileError(f"{d}: {WEIGHTS} and {INFO} come from different exports ({EXPORT_ID} {weights_id!r} vs "
                             f"{info_id!r}; e.g. the run was killed between writing them): rerun the training "
                             "command with the same run.output_dir to export the model again")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[MultiVAE, dict[str, Any]]:
    """(MultiVAE in eval mode with the trained weights, the JSON info)."""
    d = Path(model_dir)
    if not (d / WEIGHTS).is_file() or not (d / INFO).is_file():
        raise FileNotFoundError(f"{d} is not an exported model (needs {WEIGHTS} and {INFO})")
    try:
        info = json.loads((d / INFO).read_text())
        args = info["model_args"]
        # what every consumer reads (jobs check the store against these): missing = a traceback later
        missing = [k for k in _INFO_KEYS if k not in info]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{d / INFO} is not a valid model description: {exc}") from None
    if missing:
        raise ModelFileError(f"{d / INFO} is not a valid model description: it lacks {missing}")
    _check_training_store(info.get(TRAINING_STORE), d / INFO)
    try:
        with safe_open(str(d / WEIGHTS), framework="pt") as f:  # safetensors: a header + raw tensor bytes, never code
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
            weights_id = (f.metadata() or {}).get(EXPORT_ID)
    except SafetensorError as exc:
        raise ModelFileError(f"{d / WEIGHTS} is not a valid safetensors file ({exc}); refusing to load it") from None
    _check_pair(info.get(EXPORT_ID), weights_id, d)
    try:
        module = MultiVAE(**args)
    except (TypeError, ValueError) as exc:  # an unknown option, a wrong type or value: the file, not our code
        raise ModelFileError(f"{d / INFO} holds invalid model arguments: {exc}") from None
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        raise ModelFileError(f"{d / WEIGHTS} does not match {d / INFO}: {str(exc).splitlines()[0]}") from None
    return module.to(device).eval(), info
