"""Typed configuration of ``mva-infer`` (conf/infer.yaml -> InferConfig through data.typed_config).

Top-level keys are shared by every job; each job's own options live in one nested section
(``expression.*``, ``accessibility.*``, ``de.*`` (used by ``de`` and ``da``), ``export.*``, ``embed.*``)
so a key of one job cannot silently change another. conf/infer.yaml lists every section, so Hydra
overrides such as ``expression.genes=[CD3E,CD4]`` work and unknown keys fail at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from data.typed_config import ConfigError, to_typed

JOBS = ("embed", "expression", "accessibility", "de", "da", "export")
# job -> "module:function" that runs it (imported lazily so a job's heavy imports cost only that job)
RUNNERS = {
    "embed": "trainer.jobs.embed:run_embed",
    "expression": "trainer.jobs.expression:run_expression",
    "accessibility": "trainer.jobs.accessibility:run_accessibility",
    "de": "trainer.jobs.de:run_de",
    "da": "trainer.jobs.de:run_da",
    "export": "trainer.jobs.export:run_export",
}
# obsm key suffix per latent: "joint" -> X_multivi, "expression" -> X_multivi_expression, ...
LATENTS = {"joint": "joint", "expression": "rna", "accessibility": "atac"}


@dataclass
class EmbedOptions:
    umap_png: Optional[str] = None  # also draw a UMAP of the joint latent coloured by batch/modality/label


@dataclass
class ExpressionOptions:
    genes: Optional[list[str]] = None  # gene-name subset (None = all genes, model order)
    transform_batch: Optional[list[Any]] = None  # batch labels/codes; several are averaged; None = own
    library_size: Any = 1.0  # a positive number, or "observed" (the cell's own RNA count)
    dtype: str = "float32"  # float32 | float16


@dataclass
class AccessibilityOptions:
    regions: Optional[list[str]] = None  # region-name subset (None = all regions, model order)
    transform_batch: Optional[list[Any]] = None
    normalize_cells: bool = False
    normalize_regions: bool = False
    threshold: Optional[float] = None  # keep p >= threshold only, written sparse (CSR)
    dtype: str = "float32"  # float32 | float16 | uint8 (p quantised to round(255 p))


@dataclass
class DiffOptions:
    groupby: Optional[str] = None  # obs column; with group1=None: one-vs-rest for every group
    group1: Optional[list[str]] = None
    group2: Optional[str] = None  # None = the rest of the cells
    cells1: Optional[str] = None  # explicit cell sets: a text file of cell ids, one per line
    cells2: Optional[str] = None
    mode: str = "vanilla"  # vanilla | change
    delta: Optional[float] = None  # change mode; None = the reference's default
    pseudocounts: float = 0.0
    fdr_target: float = 0.05
    batch_correction: bool = False
    n_samples_overall: Optional[int] = None
    max_cells_per_group: int = 5000  # cells sampled per group (the reference's default subsampling)
    features: Optional[list[str]] = None  # gene/region subset
    two_sided: bool = True  # da only
    format: str = "csv"  # csv | parquet


@dataclass
class ExportOptions:
    direction: str = "to_scvi"  # to_scvi: write a MULTIVI.load() directory; from_scvi: import one
    source: Optional[str] = None  # from_scvi: the scvi-tools model directory to import


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
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    expression: ExpressionOptions = field(default_factory=ExpressionOptions)
    accessibility: AccessibilityOptions = field(default_factory=AccessibilityOptions)
    de: DiffOptions = field(default_factory=DiffOptions)
    export: ExportOptions = field(default_factory=ExportOptions)

    def __post_init__(self) -> None:
        if self.job not in JOBS:
            raise ConfigError(f"job must be one of {JOBS}, got {self.job!r}")
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
