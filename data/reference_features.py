"""The features a new store must have for a trained model to read it (``mva-build features_from=...``).

A model reads a store only if the store's genes and regions are the model's, by name and in order
(``trainer.jobs.common.open_checked_store``). New data rarely comes that way: another feature order,
some features missing, extra ones. ``features_from`` names a model (run directory or exported model
directory) or a store, and the build then writes exactly its features: inputs' columns are moved to the
model's positions, features the model lacks are dropped, and features no input has are zero columns (the
reference's ``MULTIVI.prepare_query_mudata``, done out of core while the store is written).

Kept free of ``trainer`` (``data`` is the lower package): a model is read from its ``model.json`` only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from data import keys
from data.store import StoreError, open_store
from data.validate import ValidationError

log = logging.getLogger("mva-build")

# scvi-tools' prepare_query_anndata warns below this share of the reference's features (MIN_VAR_NAME_RATIO)
MIN_SHARE = 0.8


def find_model_dir(path: str | os.PathLike) -> Path | None:
    """The exported model directory ``path`` names: itself, or a training run directory's model/ (None: neither)."""
    p = Path(path)
    return next((d for d in (p, p / "model") if (d / keys.MODEL_WEIGHTS).is_file() and (d / keys.MODEL_INFO).is_file()),
                None)


def not_a_model(p: Path, key: str) -> str | None:
    """Why the existing directory ``p`` (no exported model found in it) is not one, with the value ``key`` takes
    instead; None where it is nothing we recognise. A training checkpoint also holds a ``model.pt``: it was
    taken for a scvi-tools model, and the suggested import then failed."""
    if (p / "trainer.pt").is_file():  # trainer/checkpoint.py: <run>/checkpoints/step_N/{model.pt, trainer.pt}
        run = p.resolve().parent.parent  # resolved: from inside checkpoints/, model_dir=step_N has parent "."
        fix = f"use {key}={run}" if find_model_dir(run) is not None else \
            f"finish the run first (it exports {run / 'model'}), then use {key}={run}"
        return f"{p} is a training checkpoint (weights with the optimizer's state), not an exported model: {fix}"
    if (p / "model.pt").is_file():  # a scvi-tools model: its var names sit in a pickle that data/ does not open
        return (f"{p} looks like a scvi-tools model (model.pt): import it first with mva-infer job=export "
                f"export.direction=from_scvi export.source={p} output=<dir>, then use {key}=<dir>")
    return None


def reference_features(path: str | os.PathLike) -> tuple[dict[str, pd.Index], str]:
    """``({"rna": genes, "atac": regions}, description)`` of a model directory, run directory or store."""
    p = Path(path)
    d = find_model_dir(p)
    if d is not None:
        info = d / keys.MODEL_INFO
        try:
            j = json.loads(info.read_text())
            if j.get("format") != keys.MODEL_FORMAT:
                raise ValueError(f"format {j.get('format')!r} is not {keys.MODEL_FORMAT!r}")
            names = {keys.RNA: j["gene_names"], keys.ATAC: j["region_names"]}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValidationError(f"features_from: {info} is not a readable model description ({exc})") from None
        return {m: _index(v, m, info) for m, v in names.items()}, f"model {d}"
    if not p.exists():
        raise ValidationError(f"features_from: {p} does not exist")
    why = not_a_model(p, "features_from")
    if why:
        raise ValidationError(f"features_from: {why}")
    try:
        meta = open_store(p).meta
    except StoreError as exc:
        raise ValidationError(f"features_from: {p} is neither a model directory ({keys.MODEL_WEIGHTS} + "
                              f"{keys.MODEL_INFO}), a run directory with model/, nor a store ({exc})") from None
    return {keys.RNA: _index(meta.gene_names, keys.RNA, p), keys.ATAC: _index(meta.region_names, keys.ATAC, p)}, f"store {p}"


def _index(names, modality: str, where) -> pd.Index:
    idx = pd.Index([str(n) for n in names], dtype=str)
    if not idx.is_unique:  # our builds and exports never write such a list; a hand-edited model.json might
        raise ValidationError(f"features_from: {where} lists {modality} feature {idx[idx.duplicated()][0]!r} twice")
    return idx


def report_padding(al, measured: list[dict[str, bool]]) -> None:
    """Log what ``features_from`` padded with zero columns (``al``: a data.convert.align.Alignment), per input,
    warning where an input has under MIN_SHARE of a modality's features (scvi-tools warns per AnnData too)."""
    for mod, per_input in al.padded.items():
        n = len(al.names[mod])
        if not n:
            continue
        if not any(m[mod] for m in measured):
            log.info("no input measures %s: the store lists features_from's %d %s features, no cell measured there",
                     mod, n, mod)
            continue
        for where, pad in per_input.items():
            share = 1 - len(pad) / n
            if share < MIN_SHARE:  # zeros where a model expects measured features bias every cell that has them
                log.warning("%s has %d of features_from's %d %s features (%.1f %%, under %.0f %%): the other %d are "
                            "zero columns for its cells (e.g. %s); expect a poor fit", where, n - len(pad), n, mod,
                            100 * share, 100 * MIN_SHARE, len(pad), pad[:5])
            elif pad:
                log.info("%s lacks %d of features_from's %d %s features: zero columns for its cells (e.g. %s)", where,
                         len(pad), n, mod, pad[:5])
