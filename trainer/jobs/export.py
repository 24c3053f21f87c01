"""export: model interchange with scvi-tools (``trainer/scvi_io.py``, ``trainer/scvi_import.py``), as an
``mva-infer`` job.

    mva-infer job=export export.direction=to_scvi model_dir=<run or model dir> store=<store> output=<dir>
    mva-infer job=export export.direction=from_scvi export.source=<scvi dir> output=<our model dir>

``to_scvi`` writes a directory for ``scvi.model.MULTIVI.load(output, adata=mdata)`` (build ``mdata`` with
``trainer.scvi_io.store_to_mudata``); ``store`` is only checked against the model. ``from_scvi`` writes our
exported model format, which every other job and ``trainer.api.load`` accept as ``model_dir``.

The output is written under a temporary name next to it and renamed when complete, so a crash never
leaves a half-written model under the final name. Only rank 0 works (the files are small); other ranks of
a torchrun launch wait at the barrier.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer import dist
from trainer.export import INFO
from trainer.infer_config import InferConfig
from trainer.jobs.common import InferError, resolve_model_dir
from trainer.scvi_import import import_from_scvi
from trainer.scvi_io import ScviIOError, check_replaceable, export_to_scvi, mudata_call

DIRECTIONS = ("to_scvi", "from_scvi")
_UNSET = ("", "???", "-")  # what a user passes for a top-level path this direction does not use


def _given(value) -> str | None:
    return None if value is None or str(value) in _UNSET else str(value)


def run_export(cfg: InferConfig) -> dict:
    opts = cfg.export
    if opts.direction not in DIRECTIONS:
        raise InferError(f"export.direction must be one of {list(DIRECTIONS)}, got {opts.direction!r}")
    out = Path(cfg.output)
    try:  # before any rank starts: a refused output costs nothing
        check_replaceable(out, opts.direction, cfg.overwrite, flag="overwrite=true")
    except ScviIOError as exc:
        raise InferError(str(exc)) from None
    info = dist.init_distributed(cfg.timeout_s, device=cfg.device)
    result: dict = {"output": str(out), "direction": opts.direction}
    try:
        if info.is_main:
            if opts.direction == "to_scvi":
                if _given(opts.source):
                    raise InferError("export.source is the scvi-tools directory to import (direction=from_scvi); "
                                     "to_scvi exports model_dir")
                model_dir = _given(cfg.model_dir)
                if model_dir is None:
                    raise InferError("direction=to_scvi needs model_dir=<run or model directory>")
                export_to_scvi(model_dir, out, store=_given(cfg.store), overwrite=cfg.overwrite)
                call = mudata_call(json.loads((resolve_model_dir(model_dir) / INFO).read_text()))  # checked above
                result["load_with"] = f"scvi.model.MULTIVI.load({str(out)!r}, adata={call})"
            else:
                source = _given(opts.source)
                if source is None:
                    raise InferError("direction=from_scvi needs export.source=<scvi-tools model directory>")
                if not Path(source).exists():
                    raise InferError(f"export.source {source} does not exist")
                import_from_scvi(source, out, overwrite=cfg.overwrite)
            dist.print0(f"[infer] export {opts.direction}: -> {out}")
    except ScviIOError as exc:
        raise InferError(str(exc)) from None
    finally:
        dist.barrier()  # other ranks return only once rank 0 has published (or failed)
    return result
