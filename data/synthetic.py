"""mva-synth: a synthetic multiome atlas written block by block straight into a store.

Generative story (fixed by ``seed``; ``python -m data.synthetic n_cells=...`` or ``mva-synth``):
- cell types with marker genes (``marker_fold`` x) and type-specific open peaks (``peak_fold`` x);
- batches shift every gene and region on the log scale (``batch_effect``) and the sequencing depth;
- RNA: negative binomial (Gamma-Poisson, per-gene dispersion) with log-normal library sizes around
  ``rna_library_median``;
- ATAC: per cell ~1.2 x ``atac_density * n_regions`` fragments drawn from the type/batch accessibility
  profile; duplicates add up, so counts are mostly 1-2 and the share of regions with a nonzero count is
  ~``atac_density`` at realistic densities (<= 0.05: 0.04 gives ~3.8 %) and lower above, where more
  fragments land on open regions again (0.1 -> ~8.6 %, 0.3 -> ~20 %, 0.5 -> ~29 %, 1 -> ~44 %);
- each cell is paired, RNA-only or ATAC-only with the configured fractions; labels are stored.
Memory is bounded by one block plus one shard of the writer, so 2,000,000 cells work like 4,000.
Each block draws from its own generator ``default_rng([seed, block])``: the data does not depend on
``shard_size``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from data.cli import check_overrides, one_line_errors
from data.config import SynthConfig
from data.store_format import StoreSchema, check_codec
from data.writer import StoreWriter


class _Params:
    """Everything shared by all blocks: profiles per (cell type, batch)."""

    def __init__(self, c: SynthConfig):
        rng = np.random.default_rng([c.seed, 2**31])
        T, B, G, R = c.n_cell_types, c.n_batches, c.n_genes, c.n_regions
        self.type_p = rng.dirichlet(np.full(T, 5.0))
        gene_base = rng.normal(0.0, 1.2, G)
        gene_type = rng.normal(0.0, 0.2, (T, G))
        for t in range(T):
            gene_type[t, rng.choice(G, min(c.n_markers, G), replace=False)] += np.log(c.marker_fold)
        gene_batch = rng.normal(0.0, c.batch_effect, (B, G))
        logits = gene_base[None, None] + gene_type[:, None] + gene_batch[None]  # (T, B, G)
        rho = np.exp(logits - logits.max(-1, keepdims=True))
        self.rho = (rho / rho.sum(-1, keepdims=True)).reshape(T * B, G)
        self.theta = np.exp(rng.normal(np.log(4.0), 0.5, G))  # per-gene NB inverse dispersion
        self.lib_batch = np.exp(rng.normal(0.0, 0.2, B))
        n_peaks = c.n_type_peaks or max(1, R // (2 * T))
        reg_base = rng.normal(0.0, 0.7, R)
        reg_type = np.zeros((T, R))
        for t in range(T):
            reg_type[t, rng.choice(R, min(n_peaks, R), replace=False)] += np.log(c.peak_fold)
        reg_batch = rng.normal(0.0, c.batch_effect, (B, R))
        acc = np.exp(reg_base[None, None] + reg_type[:, None] + reg_batch[None]).reshape(T * B, R)
        cdf = np.cumsum(acc, axis=1)
        cdf /= cdf[:, -1:]
        # One flat CDF: profile k lives in [k, k+1), so one searchsorted serves every cell of a block.
        self.flat_cdf = (cdf + np.arange(T * B)[:, None]).ravel()
        self.atac_depth_batch = np.exp(rng.normal(0.0, 0.2, B))
        self.n_regions = R


def _block(c: SynthConfig, p: _Params, b: int, start: int, n: int):
    rng = np.random.default_rng([c.seed, b])
    T, B, G, R = c.n_cell_types, c.n_batches, c.n_genes, c.n_regions
    ctype = rng.choice(T, n, p=p.type_p)
    batch = rng.integers(0, B, n)
    combo = ctype * B + batch
    # rescaled to sum to 1: write_synthetic_store accepts sums within 1e-6, numpy's choice only within ~1.5e-8
    # (0.3333333 x 3 was accepted, then refused with "Probabilities do not sum to 1"); a no-op for exact sums
    fr = np.array([c.paired_fraction, c.rna_only_fraction, c.atac_only_fraction])
    kind = rng.choice(3, n, p=fr / fr.sum())
    has_rna, has_atac = kind != 2, kind != 1

    # RNA: Gamma-Poisson on the measured cells only, one dense (n_rna, G) float32 draw.
    rna = sp.csr_matrix((n, G), dtype=np.int32)
    ri = np.flatnonzero(has_rna)
    if len(ri):
        lib = np.exp(rng.normal(np.log(c.rna_library_median), 0.5, len(ri))) * p.lib_batch[batch[ri]]
        mu = (lib[:, None] * p.rho[combo[ri]]).astype(np.float32)
        lam = rng.gamma(p.theta.astype(np.float32), 1.0, size=mu.shape).astype(np.float32)
        lam *= mu / p.theta.astype(np.float32)
        counts = sp.csr_matrix(rng.poisson(lam).astype(np.int32))
        rna = sp.csr_matrix((counts.data, counts.indices, _scatter_indptr(counts.indptr, ri, n)), shape=(n, G))

    # ATAC: draw fragments from each cell's profile; duplicates add up to counts of 2, 3, ...
    ai = np.flatnonzero(has_atac)
    atac = sp.csr_matrix((n, R), dtype=np.int32)
    if len(ai):
        depth = np.exp(rng.normal(0.0, 0.4, len(ai))) * p.atac_depth_batch[batch[ai]]
        k = rng.poisson(c.atac_density * R * 1.1 * depth)  # +10 %: duplicates merge into one nonzero
        rows = np.repeat(ai, k)
        u = rng.random(rows.size) + np.repeat(combo[ai], k)
        cols = np.searchsorted(p.flat_cdf, u) - np.repeat(combo[ai], k) * R
        cols = np.clip(cols, 0, R - 1)
        atac = sp.coo_matrix((np.ones(rows.size, np.int32), (rows, cols)), shape=(n, R)).tocsr()
        atac.sum_duplicates()

    obs = pd.DataFrame({
        "batch": np.array([f"batch_{i}" for i in range(B)])[batch],
        "cell_type": np.array([f"type_{i}" for i in range(T)])[ctype],
        "mask_rna": has_rna, "mask_atac": has_atac,
    }, index=[f"cell_{i:09d}" for i in range(start, start + n)])
    if c.with_covariates:
        obs["site"] = np.where(rng.random(n) < 0.5, "site_a", "site_b")
        obs["pct_mito"] = rng.beta(2.0, 40.0, n).astype(np.float32)
    return rna, atac, obs


def _scatter_indptr(indptr: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """indptr of an (n, .) matrix whose rows ``rows`` are the rows of a compact matrix (others empty)."""
    nnz = np.zeros(n, np.int64)
    nnz[rows] = np.diff(indptr)
    return np.concatenate([[0], np.cumsum(nnz)])


def check_ranges(c: SynthConfig) -> None:
    """Refuse out-of-range options by name before any work (SynthConfig itself checks finiteness only)."""
    fr = (c.paired_fraction, c.rna_only_fraction, c.atac_only_fraction)
    if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"paired/rna_only/atac_only fractions must be >= 0 and sum to 1, got {fr}")
    sizes = {k: getattr(c, k) for k in ("n_cells", "n_genes", "n_regions", "n_batches", "n_cell_types", "block_size",
                                        "shard_size")}
    if min(sizes.values()) < 1:  # else a bare numpy / ZeroDivisionError deep in the generator
        raise ValueError("must be >= 1: " + ", ".join(f"{k}={v}" for k, v in sizes.items() if v < 1))
    # atac_density is a fraction of n_regions (see SynthConfig): above 1 it was accepted and drew more
    # fragments per cell than there are regions, a store no real assay resembles
    knobs = {"marker_fold": c.marker_fold > 0, "peak_fold": c.peak_fold > 0, "rna_library_median": c.rna_library_median > 0,
             "atac_density": 0 < c.atac_density <= 1, "batch_effect": c.batch_effect >= 0, "n_markers": c.n_markers >= 0,
             "n_type_peaks": c.n_type_peaks >= 0, "seed": c.seed >= 0}
    # else numpy's "lam < 0" / "scale < 0" / "expected non-negative integer" (seed) deep in the generator, or NaN
    # profiles
    if not all(knobs.values()):
        raise ValueError("out of range (folds, library median > 0; 0 < atac_density <= 1; batch_effect, n_markers, "
                         "n_type_peaks, seed >= 0): "
                         + ", ".join(f"{k}={getattr(c, k)}" for k, ok in knobs.items() if not ok))


def write_synthetic_store(path: str | Path, n_cells: int = 4000, n_genes: int = 500, n_regions: int = 2000,
                          seed: int = 0, **options) -> Path:
    """Write a synthetic store and return its path. ``options`` = any other :class:`SynthConfig` field."""
    c = SynthConfig(out=str(path), n_cells=n_cells, n_genes=n_genes, n_regions=n_regions, seed=seed, **options)
    check_ranges(c)
    check_codec(c.codec)  # before any work: a typo fails at once
    p = _Params(c)
    schema = StoreSchema(
        gene_names=[f"gene_{i:05d}" for i in range(c.n_genes)],
        region_names=[f"chr{1 + i % 22}:{1000 * (i // 22) + 1}-{1000 * (i // 22) + 501}" for i in range(c.n_regions)],
        batch_key="batch", batch_categories=[f"batch_{i}" for i in range(c.n_batches)],
        cat_cov_keys=["site"] if c.with_covariates else [],
        cat_cov_categories={"site": ["site_a", "site_b"]} if c.with_covariates else {},
        cont_cov_keys=["pct_mito"] if c.with_covariates else [],
        label_key="cell_type", label_categories=[f"type_{i}" for i in range(c.n_cell_types)],
    )
    source = {"kind": "synthetic", "config": asdict(c)}
    # every cell's type, batch and modalities are drawn independently: store order is already random
    with StoreWriter(c.out, schema, shard_size=c.shard_size, overwrite=c.overwrite, source=source,
                     preshuffled=True, codec=c.codec) as w:
        bar = tqdm(total=c.n_cells, unit="cell", desc="mva-synth", disable=not c.progress)
        for b, start in enumerate(range(0, c.n_cells, c.block_size)):
            n = min(c.block_size, c.n_cells - start)
            w.append(*_block(c, p, b, start, n))
            bar.update(n)
        bar.close()
    return Path(c.out)


def main() -> None:
    import hydra

    from data.typed_config import to_typed

    @hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent.parent / "conf"),
                config_name="synth")
    def _run(cfg) -> None:
        # ConfigError/StoreError are ValueErrors; OSError: an unwritable output
        with one_line_errors("mva-synth", (ValueError, OSError)):
            d = asdict(to_typed(cfg, SynthConfig))
            out = write_synthetic_store(d.pop("out"), d.pop("n_cells"), d.pop("n_genes"), d.pop("n_regions"),
                                        d.pop("seed"), **d)
        print(f"wrote {out}")

    check_overrides("mva-synth", SynthConfig)
    _run()


if __name__ == "__main__":
    main()
