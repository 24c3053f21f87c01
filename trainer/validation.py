"""Validation of a training run: exact held-out reconstruction, ELBO and KL per cell over ranks, and the
end-of-run warning when the latent learned nothing."""

from __future__ import annotations

import math

import numpy as np
import torch

from data import keys
from data.collate import to_device
from trainer import dist

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64; wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def cell_noise(seed: int, index: torch.Tensor, n_latent: int) -> torch.Tensor:
    """(B, n_latent) float32 standard-normal noise for the cells with store rows ``index``: a function of
    (seed, row) only -- splitmix64 of a per-cell counter, then Box-Muller.

    Why keyed by the cell: drawn from a generator, a cell's posterior sample depended on which rank and batch
    it landed in, so the same run on 1 and on 8 GPUs validated differently and could stop early at other
    epochs; and every validation drew new noise, so the epoch-to-epoch differences that early stopping and
    the plateau rule compare carried the noise of both draws. Keyed, each cell gets the same draw at every
    validation, on any number of ranks, in any batch."""
    rows = np.asarray(index.cpu().numpy(), dtype=np.uint64)
    key = _mix64(np.asarray([seed], dtype=np.uint64) + _GOLDEN)
    counters = rows[:, None] * np.uint64(2 * n_latent) + np.arange(2 * n_latent, dtype=np.uint64)[None, :]
    bits = _mix64(counters * _GOLDEN + key)
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1), 53 bits
    u1, u2 = 1.0 - u[:, :n_latent], u[:, n_latent:]  # u1 in (0, 1]: log(u1) is finite
    return torch.from_numpy((np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32))


@torch.no_grad()
def score_cells(module: torch.nn.Module, batch: dict, device: torch.device, seed: int,
                kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-cell float64 terms of a held-out batch under each cell's keyed noise: ``recon_rna``, ``recon_atac``,
    ``kl`` and ``neg_elbo`` (= reconstruction + KL + modality penalty, the reference's ``elbo_*`` per cell).
    The trainer's validation and the API's ``elbo`` / ``reconstruction_error`` both score with it."""
    eps = cell_noise(seed, batch[keys.INDEX], module.n_noise).to(device)
    out = module.loss(to_device(batch, device), kl_weight=kl_weight, eps=eps)
    rna, atac, kl = out.recon_rna.double(), out.recon_atac.double(), out.kl.double()
    lib = torch.zeros_like(kl) if out.kl_library is None else out.kl_library.double()  # part of kl (lognormal)
    return {"recon_rna": rna, "recon_atac": atac, "kl": kl, "kl_library": lib,
            "neg_elbo": rna + atac + kl + out.penalty.double()}


@torch.no_grad()
def validate(module: torch.nn.Module, stream, device: torch.device, kl_weight: float,
             seed: int = 0) -> dict[str, float]:
    """Validation reconstruction and ELBO per cell, exact over ranks: sums and counts are all-reduced
    (a mean of per-rank means would weight a short last rank wrongly).

    Each cell's posterior draw is ``cell_noise(seed, its row)``: the same at every validation and on any
    number of ranks. Anything else the model might draw comes from a forked RNG state: validating never
    shifts the training run's dropout and noise streams, so where and how often a run validates (an epoch
    end, a max_steps stop inside an epoch) cannot change its weights, and a run resumed after such a stop
    matches the uninterrupted one."""
    # One model on every rank: batch-norm running statistics (model.use_batch_norm) are per rank -- each rank's
    # moved with its own last batch (DDP copies rank 0's over them only at the next forward; DeepSpeed never
    # does) -- so a rank's validation scored another model than the one checkpointed and exported (rank 0's).
    # Training never reads them (train-mode batch norm normalises by the batch), so copying them changes no step.
    dist.broadcast_tensors_(list(module.buffers()))
    module.eval()
    sums = {"recon": 0.0, "elbo": 0.0, "kl": 0.0, "kl_library": 0.0, "n": 0.0}
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        for batch in stream:
            t = score_cells(module, batch, device, seed, kl_weight)
            sums["recon"] += float((t["recon_rna"] + t["recon_atac"]).sum())
            sums["elbo"] += float(t["neg_elbo"].sum())
            sums["kl"] += float(t["kl"].sum())
            sums["kl_library"] += float(t["kl_library"].sum())
            sums["n"] += t["kl"].shape[0]
    module.train()
    tot = dist.all_reduce_sums(sums)
    if tot["n"] == 0:
        return {}
    lib = {"kl_library_validation": tot["kl_library"] / tot["n"]} if module.n_noise > module.n_latent else {}
    return {"reconstruction_loss_validation": tot["recon"] / tot["n"],
            "elbo_validation": tot["elbo"] / tot["n"], "kl_validation": tot["kl"] / tot["n"],
            "n_validation": tot["n"], **lib}


# Below this KL per held-out cell (nats, over all latent dimensions) the posterior is the prior for every
# cell: the embedding cannot separate cells (PBMC test subset, 30 epochs at optim.lr=1e-3: 0.167, as in
# tests/test_loop_collapse.py; at the defaults 0.53-0.55 after 10-40 epochs; trained models: 10s)
COLLAPSED_KL = 0.5


def warn_if_collapsed(last_val: dict[str, float]) -> None:
    # z's KL: a lognormal library's KL (in kl_validation, ~3 nats per cell) hid a collapsed latent
    kl = last_val.get("kl_validation") if last_val else None
    kl = None if kl is None else kl - last_val.get("kl_library_validation", 0.0)
    if kl is not None and math.isfinite(kl) and kl < COLLAPSED_KL:
        dist.print0(f"[train] warning: the latent carries almost no information (KL {kl:.3g} nats per held-out "
                    "cell): embeddings will not separate cells and imputations are nearly the same for every "
                    "cell. Train longer, raise optim.lr, or check the data (docs/quality.md)")
