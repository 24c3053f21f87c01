"""The per-batch prior of the latent RNA log-library (``model.rna_library=lognormal``).

scvi-tools' ``VAE`` with ``use_observed_lib_size=False`` (what MultiVI's paper describes; the reference
``MULTIVAE`` uses a deterministic library network instead) puts a prior N(m_b, v_b) on each cell's log
library, with m_b and v_b the mean and variance of log(total RNA counts) over the cells of batch b. The
store already holds those moments (``stats/rna_library_log_mean`` / ``_var``, over its RNA-measured cells,
written at build time, so nothing reads the counts again here).

Batches of the model with fewer than 10 RNA-measured cells in the store get the moments pooled over the
store's RNA cells: a batch of ATAC-only cells, or one a query model knows from its reference, whose prior
never scores a cell of this store but must be finite; and a batch too small for its variance to mean anything
(two cells of near-equal libraries gave a prior so narrow that their KL, ~3e5 nats, swamped the ELBO).
Variances are floored at 1e-4 (the posterior's own floor), so a batch of identical libraries gives a finite KL.
"""

from __future__ import annotations

import numpy as np
import torch

_MIN_VAR = 1e-4
_MIN_CELLS = 10  # RNA cells a batch needs for moments of its own


def prior_moments(stats: dict[str, np.ndarray], store_batches: list[str],
                  model_batches: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, variance) float64 per model batch, from a store's ``stats`` (its batches in ``store_batches``
    order); pure, so the rule is tested without a module."""
    n = np.asarray(stats["rna_cells_per_batch"], np.float64)
    m = np.asarray(stats["rna_library_log_mean"], np.float64)
    v = np.asarray(stats["rna_library_log_var"], np.float64)
    total = n.sum()
    if total > 0:
        pooled_m = float((n * m).sum() / total)
        pooled_v = float((n * (v + m**2)).sum() / total - pooled_m**2)
    else:  # no RNA cell in the store: no cell is ever scored against this prior
        pooled_m, pooled_v = 0.0, 1.0
    where = {name: i for i, name in enumerate(store_batches)}
    mean, var = np.full(len(model_batches), pooled_m), np.full(len(model_batches), pooled_v)
    for j, name in enumerate(model_batches):
        i = where.get(name)
        if i is not None and n[i] >= _MIN_CELLS:
            mean[j], var[j] = m[i], v[i]
    return mean, np.maximum(var, _MIN_VAR)


def set_prior(module: torch.nn.Module, store, model_batches: list[str]) -> None:
    """Set ``module``'s prior buffers from ``store``'s stats (no-op unless the module has a lognormal
    library). ``model_batches``: the module's batch categories (a query model's extended list)."""
    if getattr(module, "rna_library", None) != "lognormal":
        return
    stats = store.read_stats()
    # an unnamed single batch: the store's one category, whatever the model calls it
    store_batches = list(store.meta.batch_categories) or [""]
    names = list(model_batches) or store_batches
    mean, var = prior_moments(stats, store_batches, names)
    with torch.no_grad():
        module.library_log_mean.copy_(torch.from_numpy(mean))
        module.library_log_var.copy_(torch.from_numpy(var))
