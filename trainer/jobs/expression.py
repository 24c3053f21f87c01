"""expression: normalized (denoised for RNA cells, imputed for ATAC-only cells) expression of every cell.

Output ``<output>``: an AnnData Zarr with X = cells x genes (all genes in model order, or the
``expression.genes`` subset in the given order), obs copied from the store, var = the gene names,
uns['multivi'] = the settings. X is float32 or float16 (``expression.dtype``), chunked by
``batch_size`` rows x a bounded number of columns (``runner.MAX_CHUNK_ELEMENTS``).

Semantics (reference: ``MULTIVI.get_normalized_expression``, spec 5.2; math in ``trainer.predict``):

* value = the decoder's expression scale rho (rows sum to 1 over all genes without size factors),
  times ``expression.library_size``: a positive number L (default 1.0 = rho itself, the reference's
  output) or ``"observed"`` (the cell's own RNA count; cells without RNA: the model's library);
* ``expression.transform_batch``: null = each cell's own batch; a batch label of the model (any store:
  one holding only some batches too) or integer code, or a
  list of them, decodes every cell as if from that batch, and a list is averaged (as the reference);
* ``give_mean=true`` (default) decodes the posterior mean of z (the reference's ``use_z_mean=True``,
  deterministic); ``give_mean=false`` decodes ``n_samples`` posterior draws of z and writes their
  average (a Monte Carlo posterior mean of rho; one draw when ``n_samples=1``). Unlike embed there is no
  sample axis: X is always cells x genes. Draws seed from (seed, chunk id) as in embed.
"""

from __future__ import annotations

import numpy as np
import zarr

from trainer.infer_config import InferConfig
from trainer.jobs.common import InferError, average_of_draws, batch_codes, check_dtype, select_features
from trainer.jobs.runner import ChunkJob, JobContext, create_dense, feature_chunk_cols, open_job, run_chunked
from trainer.predict import normalized_expression

DTYPES = ("float32", "float16")


def check_library_size(value) -> float | str:
    if value == "observed":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InferError(f"expression.library_size must be a positive number or 'observed', got {value!r}")
    return float(value)


class ExpressionJob(ChunkJob):
    name = "expression"
    section = "expression"

    def __init__(self, ctx: JobContext):
        super().__init__(ctx)
        opts, meta = ctx.cfg.expression, ctx.store.meta
        self.dtype = np.dtype(check_dtype(opts.dtype, DTYPES, "expression"))
        self.index, self.names = select_features(opts.genes, meta.gene_names, "gene")
        # the model's batch list, not the store's: a store of some of the model's batches numbers them from 0,
        # and its batches reach the module recoded to the model's codes (common.inference_stream)
        self.batches = [str(b) for b in ctx.model_info["batch_categories"]]
        self.codes = batch_codes(opts.transform_batch, self.batches, ctx.module.n_batch)
        self.library_size = check_library_size(opts.library_size)
        self.X: zarr.Array | None = None

    def var_names(self) -> list[str]:
        return self.names

    def uns(self) -> dict:
        out = {"library_size": self.library_size, "dtype": self.dtype.name}
        if self.codes is not None:
            out["transform_batch"] = [self.batches[c] for c in self.codes]
        return out

    def create_arrays(self, root: zarr.Group) -> None:
        rows, n_genes = self.ctx.cfg.batch_size, len(self.names)
        create_dense(root, "X", (self.ctx.n_cells, n_genes), self.dtype, rows=rows,
                     cols=feature_chunk_cols(rows, n_genes), fill_value=np.nan)

    def open_arrays(self, root: zarr.Group, work_dir) -> None:
        self.X = root["X"]

    def compute_chunk(self, k: int, lo: int, hi: int, batch: dict):
        cfg = self.ctx.cfg
        module = self.ctx.module

        def decode(n: int):
            return normalized_expression(module, batch, transform_batch=self.codes, library_size=self.library_size,
                                         n_samples=n, use_z_mean=cfg.give_mean, gene_index=self.index)

        x = average_of_draws(decode, cfg.n_samples, hi - lo, module.n_genes + module.n_regions)
        with np.errstate(over="ignore"):  # checked below, in one line (numpy's RuntimeWarning came before it)
            values = x.cpu().numpy().astype(self.dtype, copy=False)
        if self.dtype == np.float16 and not np.isfinite(values).all():
            # float16 ends at 65,504: a CPM-style library_size on a highly expressed gene would be
            # written as inf without a word
            top = float(x.max())
            raise InferError(f"expression.dtype=float16 cannot hold {top:.6g} (largest float16: 65504) in cells "
                             f"{lo}-{hi - 1}: rerun with expression.dtype=float32 or a smaller expression.library_size "
                             f"(now {self.library_size}), and overwrite=true (this unfinished float16 output is "
                             "in the way)")

        def store() -> None:
            self.X[lo:hi] = values

        return store


def run_expression(cfg: InferConfig) -> dict:
    return run_chunked(ExpressionJob(open_job(cfg)))
