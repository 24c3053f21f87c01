"""Validation of a training run: exact held-out reconstruction, ELBO and KL per cell over ranks, and the
end-of-run warning when the latent learned nothing."""

from __future__ import annotations

import math

import torch

from data.collate import to_device
from trainer import dist


@torch.no_grad()
def validate(module: torch.nn.Module, stream, device: torch.device, kl_weight: float) -> dict[str, float]:
    """Validation reconstruction and ELBO per cell, exact over ranks: sums and counts are all-reduced
    (a mean of per-rank means would weight a short last rank wrongly).

    Its posterior draws come from a forked RNG state: validating never shifts the training run's dropout
    and noise streams, so where and how often a run validates (an epoch end, a max_steps stop inside an
    epoch) cannot change its weights, and a run resumed after such a stop matches the uninterrupted one."""
    # One model on every rank: batch-norm running statistics (model.use_batch_norm) are per rank -- each rank's
    # moved with its own last batch (DDP copies rank 0's over them only at the next forward; DeepSpeed never
    # does) -- so a rank's validation scored another model than the one checkpointed and exported (rank 0's).
    # Training never reads them (train-mode batch norm normalises by the batch), so copying them changes no step.
    dist.broadcast_tensors_(list(module.buffers()))
    module.eval()
    sums = {"recon": 0.0, "elbo": 0.0, "kl": 0.0, "n": 0.0}
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        for batch in stream:
            out = module.loss(to_device(batch, device), kl_weight=kl_weight)
            recon = (out.recon_rna + out.recon_atac).double()
            sums["recon"] += float(recon.sum())
            sums["elbo"] += float((recon + out.kl.double() + out.penalty.double()).sum())
            sums["kl"] += float(out.kl.double().sum())
            sums["n"] += recon.shape[0]
    module.train()
    tot = dist.all_reduce_sums(sums)
    if tot["n"] == 0:
        return {}
    return {"reconstruction_loss_validation": tot["recon"] / tot["n"],
            "elbo_validation": tot["elbo"] / tot["n"], "kl_validation": tot["kl"] / tot["n"],
            "n_validation": tot["n"]}


# Below this KL per held-out cell (nats, over all latent dimensions) the posterior is the prior for every
# cell: the embedding cannot separate cells (PBMC test subset, 30 epochs at optim.lr=1e-3: 0.167, as in
# tests/test_loop_collapse.py; at the defaults 0.53-0.55 after 10-40 epochs; trained models: 10s)
COLLAPSED_KL = 0.5


def warn_if_collapsed(last_val: dict[str, float]) -> None:
    kl = last_val.get("kl_validation") if last_val else None
    if kl is not None and math.isfinite(kl) and kl < COLLAPSED_KL:
        dist.print0(f"[train] warning: the latent carries almost no information (KL {kl:.3g} nats per held-out "
                    "cell): embeddings will not separate cells and imputations are nearly the same for every "
                    "cell. Train longer, raise optim.lr, or check the data (docs/quality.md)")
