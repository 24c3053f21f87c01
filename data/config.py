"""Typed configs of the data entry points (converted from Hydra with ``data.typed_config.to_typed``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from data.typed_config import ConfigError


@dataclass
class SynthConfig:
    """mva-synth: a synthetic multiome atlas written straight into a store (defaults = the demo)."""

    out: str = "outputs/synth_demo.zarr"
    n_cells: int = 4000
    n_genes: int = 500
    n_regions: int = 2000
    n_batches: int = 2
    n_cell_types: int = 6
    # Modality mix; must sum to 1.
    paired_fraction: float = 0.5
    rna_only_fraction: float = 0.25
    atac_only_fraction: float = 0.25
    seed: int = 0
    shard_size: int = 65_536
    # Cells generated per step; bounds memory (a dense block of block_size x n_genes is sampled).
    block_size: int = 4096
    n_markers: int = 20  # marker genes per cell type
    marker_fold: float = 8.0
    n_type_peaks: int = 0  # type-specific open peaks per type; 0 = n_regions // (2 * n_cell_types)
    peak_fold: float = 10.0
    rna_library_median: float = 1500.0
    # ATAC fragments per cell as a fraction of n_regions, in (0, 1]: the nonzero share of an average cell is
    # ~atac_density up to ~0.05 and lower above, as fragments pile onto open regions (0.5 gives ~0.29;
    # data/synthetic.py's docstring has the measured curve)
    atac_density: float = 0.04
    batch_effect: float = 0.3  # sd of the per-batch log-scale shift of every gene / region
    with_covariates: bool = False  # add categorical "site" and continuous "pct_mito"
    # Compression of the count arrays: lz4 (default) | zstd (smallest) | none (fastest reads, ~2x disk);
    # data.store_format.CODECS, docs/store.md
    codec: str = "lz4"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # only finiteness here: write_synthetic_store checks the ranges. peak_fold=inf put every ATAC count of
        # every cell into region 0 (NaN profiles); the other infinities ended in numpy's 'lam value too large'
        # and NaN fractions in 'Probabilities contain NaN', neither naming the key
        for key in ("paired_fraction", "rna_only_fraction", "atac_only_fraction", "marker_fold", "peak_fold",
                    "rna_library_median", "atac_density", "batch_effect"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key} must be a finite number, got {getattr(self, key)}")
        # counts are drawn as int32: a median of 1e12 wrapped them (stored values up to 4.29e9, silently).
        # 1e7 keeps a cell's largest gene count (library x e^(3 sd) x batch factor) far below 2**31
        if self.rna_library_median > 1e7:
            raise ConfigError(f"rna_library_median must be <= 1e7 (counts are int32), got {self.rna_library_median}")


# what each input kind reads besides its files (data/convert/base.py); kind-specific keys elsewhere were ignored
_KIND_KEYS = {"h5ad_pair": ("rna", "atac"), "h5mu": ("path",), "scvi": ("path", "n_genes", "modality_key"),
              "tenx_h5": ("path",)}


@dataclass
class InputConfig:
    """One input of mva-build. ``kind``: h5mu | h5ad_pair | scvi | tenx_h5 (see docs/store.md)."""

    kind: str = "h5ad_pair"
    path: str | None = None  # h5mu / scvi .h5ad / 10x .h5
    rna: str | None = None  # h5ad_pair: the RNA file (may be None for an ATAC-only input)
    atac: str | None = None  # h5ad_pair: the ATAC file (may be None for an RNA-only input)
    n_genes: int | None = None  # scvi layout without var['modality']: the first n_genes columns are genes
    modality_key: str = "modality"  # scvi layout: var column naming "Gene Expression" / "Peaks"
    batch: str | None = None  # a constant batch name for every cell of this input (overrides batch_key)
    # read the counts from layers[<layer>] instead of X in every AnnData of this input that has it (X
    # normalised, counts kept aside; an AnnData without the layer is read from X, still checked for integers);
    # "raw.X" reads adata.raw (its X and its own genes: CELLxGENE / SeuratDisk files)
    layer: str | None = None
    # prepended to every cell id of this input: several 10x samples share barcodes (AAAC...-1), and cell ids
    # must be unique across inputs (the RNA and ATAC sides are matched on the ids before the prefix)
    id_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KIND_KEYS:
            return  # open_input names the kinds
        ignored = [k for k, default in (("path", None), ("rna", None), ("atac", None), ("n_genes", None),
                                        ("modality_key", "modality"))
                   if getattr(self, k) != default and k not in _KIND_KEYS[self.kind]]
        if ignored:
            verb = "do" if len(ignored) > 1 else "does"
            raise ConfigError(f"inputs: {', '.join(f'{k}={getattr(self, k)!r}' for k in ignored)} {verb} not apply to "
                              f"kind={self.kind} (it reads {', '.join(_KIND_KEYS[self.kind])}): remove them or "
                              "set the kind they belong to")


@dataclass
class BuildConfig:
    """mva-build: convert one or several inputs into a store."""

    out: str = "???"
    inputs: list[InputConfig] = field(default_factory=list)
    batch_key: str | None = "batch"  # obs column; None = one batch per input (named by InputConfig.batch)
    cat_cov_keys: list[str] = field(default_factory=list)
    cont_cov_keys: list[str] = field(default_factory=list)
    label_key: str | None = None
    # Feature rule for several inputs: "union" keeps every feature (absent -> zero counts in inputs that
    # lack it: only safe when that input measured it), "intersection" keeps features in all inputs that
    # measure the modality. Dropped features are reported.
    feature_join: str = "intersection"
    # A trained model (run or exported model directory) or a store whose features the new store takes:
    # exactly its genes and regions in its order (absent ones as zero columns, others dropped), so that the
    # model reads the store (mva-infer; the reference's prepare_query_mudata). Replaces feature_join.
    features_from: str | None = None
    drop_empty_cells: bool = False  # a cell with no modality: error (False) or drop and report (True)
    min_gene_fraction: float = 0.0  # filters (out of core, Dask): keep genes detected in >= this fraction
    min_region_fraction: float = 0.0
    preshuffle: bool = False
    seed: int = 0
    shard_size: int = 65_536
    block_size: int = 8192
    # Compression of the count arrays: lz4 (default) | zstd (smallest) | none (fastest reads, ~2x disk);
    # data.store_format.CODECS, docs/store.md
    codec: str = "lz4"
    overwrite: bool = False
    progress: bool = True
    # Where the block-wise work runs as Dask tasks (data/dask_build.py, docs/cluster.md): null = in this
    # process (synchronous scheduler), "local" = a LocalCluster of dask_workers processes, or the address
    # of a running scheduler ("tcp://host:8786"; inputs and out on a disk all workers share).
    # preshuffle=true runs in this process only.
    dask_scheduler: str | None = None
    dask_workers: int = 2

    def __post_init__(self) -> None:
        for key in ("min_gene_fraction", "min_region_fraction"):
            # negative silently meant no filter; > 1, NaN or inf removed every feature, refused only after a
            # pass over all inputs
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1] (a fraction of the cells), got {getattr(self, key)}")
        if self.seed < 0:  # preshuffle reached numpy's SeedSequence: "expected non-negative integer", no key named
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.feature_join not in ("intersection", "union"):  # else refused only once every input was opened
            raise ConfigError(f"feature_join must be 'intersection' or 'union', got {self.feature_join!r}")
        if self.features_from is not None and (self.min_gene_fraction > 0 or self.min_region_fraction > 0):
            # a filter would remove features the model needs, and the store would no longer be readable by it
            raise ConfigError("features_from writes exactly the model's features: min_gene_fraction and "
                              "min_region_fraction must stay 0 with it")
        keys = [*self.cat_cov_keys, *self.cont_cov_keys]
        named = {"batch_key": [self.batch_key], "cat_cov_keys": self.cat_cov_keys,
                 "cont_cov_keys": self.cont_cov_keys, "label_key": [self.label_key]}
        for option, cols in named.items():
            slashed = [c for c in cols if c is not None and "/" in c]
            if slashed:  # each becomes a Zarr array name in every shard's obs: refused by zarr only when writing
                raise ConfigError(f"{option} {slashed[0]!r}: an obs column used by the store cannot contain '/' "
                                  "(a Zarr path separator); rename the column in the input")
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:  # the store (and every model trained on it) carried the same obs column twice
            raise ConfigError(f"covariate keys {dup} are listed more than once in cat_cov_keys / cont_cov_keys")
        if self.label_key is not None and self.label_key in self.cont_cov_keys:
            # one obs column per name: the float32 covariate overwrote the label's categories (the loader refused it)
            raise ConfigError(f"label_key {self.label_key!r} is also in cont_cov_keys: the store keeps one column per "
                              "name (a continuous covariate as float32, a label as categories); copy the column "
                              "under another name in obs for one of the two")
