"""The benchmark minibatch of the model-step benchmarks (``model_step.py`` on the CPU, ``gpu_step.py``).

50 % paired / 25 % RNA-only / 25 % ATAC-only cells in random order, ~35 % RNA and ~3.5 % ATAC density,
counts as a loader would give them. Only torch and ``data.keys`` are imported, so the GPU script runs
on a machine that has torch and nothing else of ours' dependencies.
"""

from __future__ import annotations

import torch

from data import keys


def synthetic_batch(g: torch.Generator, n_cells: int, n_genes: int, n_regions: int, n_batch: int) -> dict:
    """One minibatch with the benchmark's composition and densities (dense float32 counts)."""
    mask = torch.ones(n_cells, 2, dtype=torch.bool)
    mask[n_cells // 2 : 3 * n_cells // 4, 1] = False
    mask[3 * n_cells // 4 :, 0] = False
    rna = (torch.rand(n_cells, n_genes, generator=g) < 0.35) * (
        1 + torch.poisson(torch.full((n_cells, n_genes), 1.5), generator=g)
    )
    atac = (torch.rand(n_cells, n_regions, generator=g) < 0.035) * (
        1 + (torch.rand(n_cells, n_regions, generator=g) < 0.3)
    )
    perm = torch.randperm(n_cells, generator=g)
    mask = mask[perm]
    return {
        keys.RNA: (rna * mask[:, :1]).float(),
        keys.ATAC: (atac * mask[:, 1:]).float(),
        keys.MASK: mask,
        keys.BATCH: torch.randint(0, n_batch, (n_cells,), generator=g),
        keys.CAT_COVS: torch.zeros(n_cells, 0, dtype=torch.long),
        keys.CONT_COVS: torch.zeros(n_cells, 0),
        keys.INDEX: torch.arange(n_cells),
    }


def sparse(batch: dict) -> dict:
    out = dict(batch)
    out[keys.RNA], out[keys.ATAC] = batch[keys.RNA].to_sparse_csr(), batch[keys.ATAC].to_sparse_csr()
    return out
