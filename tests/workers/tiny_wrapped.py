"""Shared set-up of the 2-rank worker scripts (guard_ranks, guard_names, ds_master_weights, ds_set_lr): this rank's
training stream and a small MultiVI with its adversarial classifier, wrapped for ``dist_cfg``'s backend.
Imported by the scripts from their own directory (torchrun puts it first on sys.path)."""

from __future__ import annotations

import torch

from data.stream import StoreStream
from trainer import dist
from trainer.classifier import build_classifier
from trainer.config import load_config
from trainer.export import build_module
from trainer.parallel import Wrapped, wrap


def tiny_wrapped(store: str, info: dist.DistInfo, batch: int, dist_cfg: dict | None = None):
    """(stream, module, wrapped): seeded, so every rank and every call starts from the same weights."""
    cfg = load_config({"data": {"store": store}, "model": {"n_hidden": 16, "n_latent": 4}, "dist": dist_cfg or {}})
    torch.manual_seed(0)
    stream = StoreStream(store, batch, chunk_size=16, prefetch=0, rank=info.rank, world_size=info.world_size,
                         remainder="drop")
    module = build_module(stream.meta, cfg)
    w: Wrapped = wrap(module, build_classifier(module), cfg.optim, cfg.dist, info.device, batch)
    return stream, module, w


def deepspeed_stages(store: str, info: dist.DistInfo, batch: int, precision: str = "fp32"):
    """(stage, stream, module, wrapped, guard) for ZeRO 0, 1 and 2 in turn, each from the same weights."""
    from trainer.guard import StepGuard

    for stage in (0, 1, 2):
        stream, module, w = tiny_wrapped(store, info, batch, {"backend": "deepspeed", "zero_stage": stage,
                                                              "precision": precision})
        yield stage, stream, module, w, StepGuard(max_bad_steps=5)
