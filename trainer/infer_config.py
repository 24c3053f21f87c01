"""Typed configuration of ``mva-infer`` (conf/infer.yaml -> InferConfig through data.typed_config).

Top-level keys are shared by every job; each job's own options live in one nested section
(``expression.*``, ``accessibility.*``, ``de.*`` (used by ``de`` and ``da``), ``export.*``, ``embed.*``)
so a key of one job cannot silently change another. conf/infer.yaml lists every section, so Hydra
overrides such as ``expression.genes=[CD3E,CD4]`` work and unknown keys fail at start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from data.typed_config import ConfigError, to_typed
from trainer.config import DEVICES

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
_LATENT_ALIASES = {"rna": "expression", "atac": "accessibility"}


@dataclass
class EmbedOptions:
    umap_png: str | None = None  # also draw a UMAP of the joint latent coloured by batch/modality/label
    # also write each latent's normal posterior, obsm X_multivi*_qz_m / _qz_v (mean, variance; before an ln
    # softmax): the reference's get_latent_representation(return_dist=True)
    return_dist: bool = False

    def __post_init__(self) -> None:
        # matplotlib picks the format from the name: no suffix wrote <name>.png beside it, .jpg a JPEG
        if self.umap_png is not None and str(self.umap_png).strip() and Path(str(self.umap_png)).suffix.lower() != ".png":
            raise ConfigError(f"embed.umap_png={self.umap_png}: give the picture a .png name")


@dataclass
class ExpressionOptions:
    genes: list[str] | None = None  # gene-name subset (None = all genes, model order)
    # a batch label or integer code, or a list of them (averaged); None = each cell's own batch
    transform_batch: Any = None
    library_size: Any = 1.0  # a positive number, or "observed" (the cell's own RNA count)
    dtype: str = "float32"  # float32 | float16

    def __post_init__(self) -> None:
        v = self.library_size
        # inf passed the job's `> 0` check (trainer/jobs/expression.py, which refuses the other bad values once
        # the model is read) and wrote a matrix of inf
        if isinstance(v, float) and math.isinf(v):
            raise ConfigError(f"expression.library_size must be a finite number > 0 or 'observed', got {v!r}")


@dataclass
class AccessibilityOptions:
    regions: list[str] | None = None  # region-name subset (None = all regions, model order)
    transform_batch: Any = None  # as in expression (a list is averaged)
    normalize_cells: bool = False
    normalize_regions: bool = False
    threshold: float | None = None  # keep p >= threshold only, written sparse (CSR); 0 = null (dense)
    dtype: str = "float32"  # float32 | float16 | uint8 (round(255 p); uns['multivi']['scale'] = 1/255)
    # dense X compressed with blosc lz4? null = only uint8 (float probabilities shrink ~18 % for ~35 us of
    # CPU per cell; uncompressed chunks are written straight from the decoder output, trainer/jobs/direct_io.py)
    compress: bool | None = None

    def __post_init__(self) -> None:
        if self.threshold and self.compress is not None:
            # a threshold writes a sparse X, always compressed: compress (the dense X's) was silently ignored
            raise ConfigError(f"accessibility.compress applies to the dense X; accessibility.threshold="
                              f"{self.threshold} writes a sparse one (always compressed): leave compress null")


@dataclass
class DiffOptions:
    """``de`` / ``da`` (docs/inference_de.md). Defaults are the reference's (scvi-tools 1.5 MULTIVI)."""

    groupby: str | None = None  # obs column of the store; with group1=None: one-vs-rest for every group
    group1: list[str] | None = None
    group2: str | None = None  # None = the rest of the cells
    cells1: str | None = None  # explicit cell sets instead of groupby: a text file of cell ids, one per line
    cells2: str | None = None  # None = every cell not in cells1
    mode: str = "change"  # vanilla | change
    delta: Any = None  # change mode: a number; null = the reference's default (de 0.25, da 0.05); "auto"
    pseudocounts: Any = 1e-6  # change mode: a number, or "auto" (estimated from non-expressed features)
    test_mode: str = "three"  # change mode: three = max(P(up), P(down)), two = their sum
    fdr_target: float = 0.05
    batch_correction: bool = False  # decode each group under every batch and pair samples within batch
    n_samples_overall: int = 5000  # scale samples per group (cells drawn with replacement, seeded by `seed`)
    features: list[str] | None = None  # gene (de) / region (da) subset, by name
    block_mb: int = 1024  # memory for both groups' (samples x features) blocks; more features -> feature blocks
    format: str = "csv"  # csv | parquet

    def __post_init__(self) -> None:
        if self.mode not in ("vanilla", "change"):
            raise ConfigError(f"de.mode must be 'vanilla' or 'change', got {self.mode!r}")
        if self.test_mode not in ("two", "three"):
            raise ConfigError(f"de.test_mode must be 'two' or 'three', got {self.test_mode!r}")
        if self.format not in ("csv", "parquet"):
            raise ConfigError(f"de.format must be 'csv' or 'parquet', got {self.format!r}")
        for name in ("delta", "pseudocounts"):
            v = getattr(self, name)
            # inf: delta=inf made every proba_de 0, pseudocounts=inf every lfc NaN (inf - inf), silently
            if isinstance(v, str) and v != "auto" or isinstance(v, bool) \
                    or isinstance(v, (int, float)) and not 0 <= v < math.inf:
                raise ConfigError(f"de.{name} must be a finite number >= 0 or 'auto', got {v!r}")
        if self.pseudocounts is None:
            raise ConfigError("de.pseudocounts must be a number or 'auto', got null")
        if self.n_samples_overall < 1 or self.block_mb < 1:
            raise ConfigError("de.n_samples_overall and de.block_mb must be >= 1")
        if not 0.0 <= self.fdr_target <= 1.0:
            raise ConfigError(f"de.fdr_target must be in [0, 1], got {self.fdr_target}")
        if self.group1 is not None and isinstance(self.group1, str):
            self.group1 = [self.group1]
        if self.group1 is not None and (not self.group1 or len(set(self.group1)) < len(self.group1)):
            # []: 'ValueError: No objects to concatenate' traceback after the model and store were read;
            # a repeated group was compared twice (duplicate rows in the table)
            raise ConfigError(f"de.group1 must be null (every group) or a list of distinct groups, got {self.group1}")
        if self.mode == "vanilla":
            # vanilla mode computes P(s1 > s2) only: these change-mode options were silently ignored (it has
            # no FDR flag either: de writes no is_de_fdr column, da an empty is_da_fdr)
            ignored = [f"de.{k}={getattr(self, k)!r}" for k, default in (("delta", None), ("pseudocounts", 1e-6),
                                                                         ("test_mode", "three"), ("fdr_target", 0.05))
                       if getattr(self, k) != default]
            if ignored:
                raise ConfigError(f"{', '.join(ignored)} apply to de.mode=change only (vanilla computes P(s1 > s2)): "
                                  "remove them or use de.mode=change")
        if self.cells1 is None and self.cells2 is not None:
            raise ConfigError("de.cells2 needs de.cells1")


@dataclass
class ExportOptions:
    # to_scvi: write model_dir as a directory scvi.model.MULTIVI.load(output, adata=mdata) accepts (store, if
    # given, is checked against the model); from_scvi: import a trained scvi-tools MULTIVI directory into
    # our model format at output (trainer/scvi_io.py)
    direction: str = "to_scvi"
    source: str | None = None  # from_scvi: the scvi-tools model directory (holding model.pt) to import

    def __post_init__(self) -> None:
        if self.direction not in ("to_scvi", "from_scvi"):
            raise ConfigError(f"export.direction must be 'to_scvi' or 'from_scvi', got {self.direction!r}")


@dataclass
class InferConfig:
    # required by every job except export from_scvi (which reads export.source); checked below
    model_dir: str | None = None  # a run directory (its model/ is used) or an exported model directory
    store: str | None = None  # store to run on: the training store or one with the same features
    job: str = "embed"
    output: str = MISSING  # output path (embed: an AnnData .zarr directory)
    batch_size: int = 1024  # cells per forward pass = rows per output chunk (one done-marker each)
    give_mean: bool = True  # posterior mean; False draws n_samples posterior samples
    n_samples: int = 1
    seed: int = 0  # for posterior samples (give_mean=false); each chunk seeds from (seed, chunk)
    modalities: list[str] = field(default_factory=lambda: ["joint", "expression", "accessibility"])
    overwrite: bool = False  # replace a complete output; an unfinished one is always resumed
    progress: bool = True  # progress bar on rank 0
    timeout_s: int = 1800  # torchrun: a rank that stops answering (lost node) fails the others after this
    device: str = "auto"  # auto (each rank's GPU where torch sees one, else the CPU) | cuda (refused without) | cpu
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    expression: ExpressionOptions = field(default_factory=ExpressionOptions)
    accessibility: AccessibilityOptions = field(default_factory=AccessibilityOptions)
    de: DiffOptions = field(default_factory=DiffOptions)
    export: ExportOptions = field(default_factory=ExportOptions)

    def __post_init__(self) -> None:
        if self.job not in JOBS:
            raise ConfigError(f"job must be one of {JOBS}, got {self.job!r}")
        from_scvi = self.job == "export" and self.export.direction == "from_scvi"
        needed = [] if from_scvi else ["model_dir"] if self.job == "export" else ["model_dir", "store"]
        missing = [k for k in needed if getattr(self, k) in (None, "", "???")]
        if missing:
            raise ConfigError(f"missing config value: {', '.join(missing)} (job={self.job})")
        if self.timeout_s < 1:
            raise ConfigError(f"timeout_s must be >= 1, got {self.timeout_s}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seed < 0:  # de/da seed numpy's SeedSequence, which takes no negative numbers (a traceback)
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.seed >= 2**44:
            # posterior draws seed torch with seed * 1_000_003 + chunk (< 2**64): larger seeds were an overflow
            # traceback (or one writing uns['multivi']['seed'])
            raise ConfigError(f"seed must be < 2**44, got {self.seed}")
        if not str(self.output).strip():
            # Path("") is the working directory: "PosixPath('.') has an empty name" traceback
            raise ConfigError("output is empty: give the output path, e.g. output=outputs/embed.zarr")
        if self.give_mean and self.n_samples != 1:
            raise ConfigError("n_samples > 1 draws posterior samples: set give_mean=false")
        if self.job in ("de", "da") and (not self.give_mean or self.n_samples != 1):
            # the reference's model functions, which de/da keep: de decodes the posterior mean of each sampled
            # cell, da one posterior draw per sampled cell; the keys were accepted and silently ignored
            raise ConfigError(f"give_mean / n_samples do not apply to job={self.job} (de decodes posterior means, "
                              f"da one posterior draw per sampled cell, as the reference; de.n_samples_overall "
                              f"sets the samples per group): leave them at give_mean=true, n_samples=1")
        suffix = Path(str(self.output)).suffix.lower()
        named = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix)
        if self.job in ("de", "da") and named is not None and named != self.de.format:
            # output=x.parquet wrote CSV text into it (pd.read_parquet: "magic bytes not found"), and back
            raise ConfigError(f"output {self.output} names a {named} file but de.format={self.de.format}: set "
                              f"de.format={named}, or give the output a .{self.de.format} name")
        if self.job in ("embed", "expression", "accessibility") and suffix in (".h5ad", ".h5mu", ".h5", ".csv", ".parquet"):
            # the job writes an AnnData Zarr directory whatever the name: sc.read_h5ad(x.h5ad) then said "Is a
            # directory"
            raise ConfigError(f"output {self.output}: job={self.job} writes an AnnData Zarr directory, not a {suffix} "
                              "file: give it a .zarr name (anndata.read_zarr reads it; .write_h5ad converts it)")
        # the notebook API's names too (trainer.api: modality="rna" / "atac"): the job's obsm keys stay the same
        self.modalities = list(dict.fromkeys(_LATENT_ALIASES.get(m, m) for m in self.modalities))
        bad = [m for m in self.modalities if m not in LATENTS]
        if bad or not self.modalities:
            raise ConfigError(f"modalities must be a non-empty subset of {list(LATENTS)} (or rna, atac), "
                              f"got {self.modalities}")


# section -> the jobs that read it (top-level keys read by only some jobs are checked in check_applies)
SECTION_JOBS = {"embed": ("embed",), "expression": ("expression",), "accessibility": ("accessibility",),
                "de": ("de", "da"), "export": ("export",)}


def check_applies(cfg: InferConfig) -> None:
    """Refuse an option set away from its default for a job that does not read it: on the command line
    ``job=embed expression.genes=[CD3E]`` or ``job=expression modalities=[joint]`` ran with the option silently
    ignored. (Python callers may pass a whole InferConfig whose other sections are simply not read.)"""
    ignored = []
    for section, jobs in SECTION_JOBS.items():
        if cfg.job in jobs:
            continue
        value, default = getattr(cfg, section), type(getattr(cfg, section))()
        ignored += [f"{section}.{f.name}" for f in fields(value) if getattr(value, f.name) != getattr(default, f.name)]
    cells = tuple(j for j in JOBS if j != "export")  # the jobs that run the model over cells
    top = {"modalities": ("embed",), "give_mean": ("embed", "expression", "accessibility"),
           "n_samples": ("embed", "expression", "accessibility"), "batch_size": cells, "seed": cells}
    default = InferConfig(model_dir="m", store="s", output="o")
    ignored += [k for k, jobs in top.items() if cfg.job not in jobs and getattr(cfg, k) != getattr(default, k)]
    if cfg.job == "export" and cfg.export.direction == "from_scvi":  # reads export.source only ("-": not given)
        ignored += [k for k in ("model_dir", "store") if getattr(cfg, k) not in (None, "", "-", "???")]
    if ignored:
        where = f"job={cfg.job}" + (f" export.direction={cfg.export.direction}" if cfg.job == "export" else "")
        verb = "do" if len(ignored) > 1 else "does"
        raise ConfigError(f"{', '.join(ignored)} {verb} not apply to {where} (it does not read them): remove them, "
                          "or choose the job they belong to")


def load_infer_config(cfg: Any) -> InferConfig:
    """The command line's config (Hydra) -> InferConfig; raises ConfigError naming a bad or ignored key."""
    typed = to_typed(cfg, InferConfig)
    check_applies(typed)
    return typed
