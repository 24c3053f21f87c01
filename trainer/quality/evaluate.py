"""One evaluator for both trained models: latents, imputations and held-out ELBO from a MultiVAE.

The reference's weights are mapped into our module (``trainer/reference.py``) before they get here,
so every number below comes from the same code for both sides; only the training differs. Cells are
fed as dense minibatches with explicit masks (the data sets are small).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from data import keys
from trainer import predict
from trainer.module import MultiVAE


@dataclass
class Outputs:
    z_joint: np.ndarray  # (n, d) joint posterior mean of every cell, as the model saw it in training
    z_rna_version: np.ndarray  # (u, d) unpaired cells encoded from their RNA alone
    z_atac_version: np.ndarray  # (u, d) the same cells encoded from their ATAC alone
    imputed_rna: np.ndarray  # (n_atac_only, G) normalized expression (rows sum to 1) of RNA-hidden cells
    imputed_atac: np.ndarray  # (n_rna_only, R) accessibility probabilities of ATAC-hidden cells
    heldout: dict[str, float]  # elbo, recon_rna, recon_atac, kl (per cell) on the validation cells


def _batch(rna: sp.csr_matrix, atac: sp.csr_matrix, mask: np.ndarray, batch: np.ndarray) -> dict:
    n = rna.shape[0]
    return {keys.RNA: torch.as_tensor(rna.toarray(), dtype=torch.float32),
            keys.ATAC: torch.as_tensor(atac.toarray(), dtype=torch.float32),
            keys.MASK: torch.as_tensor(mask, dtype=torch.bool),
            keys.BATCH: torch.as_tensor(batch, dtype=torch.long),
            keys.CAT_COVS: torch.zeros((n, 0), dtype=torch.long),
            keys.CONT_COVS: torch.zeros((n, 0), dtype=torch.float32),
            keys.INDEX: torch.arange(n, dtype=torch.long)}


def _map(fn, rna, atac, mask, batch, size: int = 256) -> np.ndarray:
    parts = [fn(_batch(rna[s:s + size], atac[s:s + size], mask[s:s + size], batch[s:s + size])).numpy()
             for s in range(0, rna.shape[0], size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


@torch.no_grad()
def heldout_elbo(module: MultiVAE, rna, atac, mask, batch, seed: int = 1234) -> dict[str, float]:
    """Per-cell ELBO terms at KL weight 1 with one fixed noise draw; recon per modality is averaged
    over the cells that measured it."""
    g = torch.Generator().manual_seed(seed)
    b = _batch(rna, atac, mask, batch)
    eps = torch.randn(rna.shape[0], module.n_noise, generator=g)
    out = module.loss(b, kl_weight=1.0, eps=eps)
    m = torch.as_tensor(mask)
    elbo = out.recon_rna + out.recon_atac + out.kl + out.penalty
    return {"elbo": float(elbo.mean()), "kl": float(out.kl.mean()),
            "recon_rna": float(out.recon_rna[m[:, 0]].mean()) if m[:, 0].any() else float("nan"),
            "recon_atac": float(out.recon_atac[m[:, 1]].mean()) if m[:, 1].any() else float("nan")}


def evaluate(module: MultiVAE, view_rna: sp.csr_matrix, view_atac: sp.csr_matrix, true_rna: sp.csr_matrix,
             true_atac: sp.csr_matrix, mask: np.ndarray, batch: np.ndarray, rna_only: np.ndarray,
             atac_only: np.ndarray, validation: np.ndarray) -> Outputs:
    """Everything the metrics need. ``view_*``: what training saw; ``true_*``: the full paired counts."""
    module = module.eval()
    z_joint = _map(lambda b: predict.latent(module, b), view_rna, view_atac, mask, batch)
    unpaired = np.concatenate([rna_only, atac_only])
    n_u = len(unpaired)
    ones, zeros = np.ones(n_u, bool), np.zeros(n_u, bool)
    z_r = _map(lambda b: predict.latent(module, b), true_rna[unpaired], true_atac[unpaired] * 0,
               np.stack([ones, zeros], 1), batch[unpaired])
    z_a = _map(lambda b: predict.latent(module, b), true_rna[unpaired] * 0, true_atac[unpaired],
               np.stack([zeros, ones], 1), batch[unpaired])
    imp_rna = _map(lambda b: predict.normalized_expression(module, b), view_rna[atac_only], view_atac[atac_only],
                   mask[atac_only], batch[atac_only])
    imp_atac = _map(lambda b: predict.normalized_accessibility(module, b), view_rna[rna_only],
                    view_atac[rna_only], mask[rna_only], batch[rna_only])
    v = np.flatnonzero(validation)
    held = heldout_elbo(module, view_rna[v], view_atac[v], mask[v], batch[v])
    return Outputs(z_joint, z_r, z_a, imp_rna, imp_atac, held)
