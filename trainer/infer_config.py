"""Typed configuration of ``mva-infer`` (conf/infer.yaml -> InferConfig through data.typed_config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from data.typed_config import ConfigError, to_typed

JOBS = ("embed", "expression", "accessibility", "de", "da", "export")
IMPLEMENTED = ("embed",)
# obsm key suffix per latent: "joint" -> X_multivi, "expression" -> X_multivi_expression, ...
LATENTS = {"joint": "joint", "expression": "rna", "accessibility": "atac"}


@dataclass
class InferConfig:
    model_dir: str = MISSING  # a run directory (its model/ is used) or an exported model directory
    store: str = MISSING  # store to run on: the training store or one with the same features
    job: str = "embed"
    output: str = MISSING  # output path (embed: an AnnData .zarr directory)
    batch_size: int = 1024  # cells per forward pass = rows per output chunk (one done-marker each)
    give_mean: bool = True  # posterior mean; False draws n_samples posterior samples
    n_samples: int = 1
    seed: int = 0  # for posterior samples (give_mean=false); each chunk seeds from (seed, chunk)
    modalities: list[str] = field(default_factory=lambda: ["joint", "expression", "accessibility"])
    overwrite: bool = False  # replace a complete output; an unfinished one is always resumed
    progress: bool = True  # progress bar on rank 0

    def __post_init__(self) -> None:
        if self.job not in JOBS:
            raise ConfigError(f"job must be one of {JOBS}, got {self.job!r}")
        if self.job not in IMPLEMENTED:
            raise ConfigError(f"job {self.job!r} is not implemented yet (implemented: {list(IMPLEMENTED)})")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.give_mean and self.n_samples != 1:
            raise ConfigError("n_samples > 1 draws posterior samples: set give_mean=false")
        bad = [m for m in self.modalities if m not in LATENTS]
        if bad or not self.modalities:
            raise ConfigError(f"modalities must be a non-empty subset of {list(LATENTS)}, got {self.modalities}")


def load_infer_config(cfg: Any) -> InferConfig:
    return to_typed(cfg, InferConfig)
