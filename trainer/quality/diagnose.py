"""End-of-training diagnostics of one trained model: what the modality-alignment penalty and the two
per-modality encoders look like after training, on the cells the model trained on.

They explain metric gaps (e.g. cross-modality FOSCTTM at low paired fractions) rather than rank the
sides, so they go into the JSON next to the metrics but not into the comparison table. Both sides are
scored by this same code on our ``MultiVAE`` (the reference's weights are mapped into it first).
Eval mode (no dropout) and the posterior means (no noise): the numbers are deterministic.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from trainer.module import MultiVAE
from trainer.quality.evaluate import _batch


def _jeffreys_parts(qm1, qv1, qm2, qv2) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of the module's Jeffreys penalty per cell (they sum to ``MultiVAE.penalty``):
    the variance mismatch and the mean distance. Same std-for-variance convention as the module."""
    a, b = qv1.sqrt(), qv2.sqrt()
    var_part = 0.5 * (a / b + b / a - 2).sum(1)
    mean_part = 0.5 * ((qm1 - qm2) ** 2 * (1 / a + 1 / b)).sum(1)
    return var_part, mean_part


@torch.no_grad()
def _encode(module: MultiVAE, rna: sp.csr_matrix, atac: sp.csr_matrix, mask: np.ndarray,
            batch: np.ndarray) -> dict[str, torch.Tensor]:
    n = rna.shape[0]
    inf = module.inference(_batch(rna, atac, mask, batch), eps=torch.zeros(n, module.n_noise))
    return {k: inf[k] for k in ("qzm_rna", "qzv_rna", "qzm_atac", "qzv_atac", "lib_rna", "lib_atac")}


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else float("nan")


@torch.no_grad()
def diagnostics(module: MultiVAE, view_rna: sp.csr_matrix, view_atac: sp.csr_matrix, true_rna: sp.csr_matrix,
                true_atac: sp.csr_matrix, mask: np.ndarray, batch: np.ndarray, train: np.ndarray,
                paired: np.ndarray, unpaired: np.ndarray) -> dict[str, float]:
    """``train``: boolean (n,) training cells; ``paired`` / ``unpaired``: data indices.

    * ``diag_penalty_paired`` (+ ``_var`` / ``_mean`` parts): the Jeffreys penalty of the paired
      training cells, i.e. the alignment term training minimised;
    * ``diag_penalty_unpaired``: the same quantity between the RNA-alone and ATAC-alone posteriors
      of the unpaired training cells, computed from their true (partly hidden) counts: the alignment
      the penalty never saw, which FOSCTTM measures by rank;
    * ``diag_train_loss_*``: per-cell training terms at KL weight 1 (posterior mean, no dropout);
    * ``diag_qzv_rna`` / ``diag_qzv_atac``: mean posterior variance of each encoder on paired
      training cells (how confident each encoder is), ``diag_lib_rna``: mean learned log-library.
    """
    module = module.eval()
    out: dict[str, float] = {}
    p = np.intersect1d(paired, np.flatnonzero(train))
    u = np.intersect1d(unpaired, np.flatnonzero(train))
    n_p = len(p)
    both = np.ones((len(p) + len(u), 2), bool)
    idx = np.concatenate([p, u])
    # every cell with both modalities visible (true counts): each encoder sees its own modality alone
    enc = _encode(module, true_rna[idx], true_atac[idx], both, batch[idx])
    var_part, mean_part = _jeffreys_parts(enc["qzm_rna"], enc["qzv_rna"], enc["qzm_atac"], enc["qzv_atac"])
    out["diag_penalty_paired"] = _mean((var_part + mean_part)[:n_p])
    out["diag_penalty_paired_var"] = _mean(var_part[:n_p])
    out["diag_penalty_paired_mean"] = _mean(mean_part[:n_p])
    out["diag_penalty_unpaired"] = _mean((var_part + mean_part)[n_p:])
    out["diag_penalty_unpaired_mean"] = _mean(mean_part[n_p:])
    out["diag_qzv_rna"] = _mean(enc["qzv_rna"][:n_p])
    out["diag_qzv_atac"] = _mean(enc["qzv_atac"][:n_p])
    out["diag_lib_rna"] = _mean(enc["lib_rna"])
    # the training objective's terms on the training view (posterior mean instead of a sample)
    t = np.flatnonzero(train)
    b = _batch(view_rna[t], view_atac[t], mask[t], batch[t])
    lo = module.loss(b, kl_weight=1.0, eps=torch.zeros(len(t), module.n_noise))
    m = torch.as_tensor(mask[t])
    out["diag_train_loss"] = float((lo.recon_rna + lo.recon_atac + lo.kl + lo.penalty).mean())
    out["diag_train_recon_rna"] = _mean(lo.recon_rna[m[:, 0]])
    out["diag_train_recon_atac"] = _mean(lo.recon_atac[m[:, 1]])
    out["diag_train_kl"] = _mean(lo.kl)
    out["diag_train_penalty_per_cell"] = _mean(lo.penalty)  # what the penalty adds to the mean loss
    return out
