"""One training step of MultiVI, split into two objectives so any backend can do backward/step itself.

Order and optimizers are the reference's (spec §4.2): forward the VAE, total = VAE loss (with KL
weight) + kappa * fool loss, VAE optimizer step (AdamW 1e-4, wd 1e-3, eps 1e-8); then the classifier
loss on the *detached* joint z, classifier optimizer step (Adam 1e-3, eps 0.01, wd 1e-3).
``train_step`` is the plain single-process composition; the distributed trainer reuses
``vae_objective`` and ``classifier_objective`` with its own DDP / DeepSpeed backward and step.
"""

from __future__ import annotations

import torch

from data import keys
from trainer.classifier import fool_loss, true_batch_loss
from trainer.module import LossOutput, MultiVAE


def build_optimizers(
    module: torch.nn.Module,
    classifier: torch.nn.Module | None = None,
    lr: float = 1e-4,
    weight_decay: float = 1e-3,
    eps: float = 1e-8,
    classifier_lr: float = 1e-3,
    classifier_eps: float = 0.01,
    classifier_weight_decay: float | None = None,
    fused: bool | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """AdamW over every trainable module parameter, Adam over the classifier (None without one).

    ``fused`` (default: on for CPU/CUDA float parameters) uses torch's single-kernel implementation,
    same math as the loop version (the reference's AdamW is fused too); per-parameter Python loops
    otherwise cost ~10 % of a step at these sizes. ``classifier_weight_decay`` None: ``weight_decay``
    (the reference's classifier takes the plan's weight decay).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    vae_opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps, fused=fused)
    cls_opt = None
    if classifier is not None:
        cls_opt = torch.optim.Adam(
            classifier.parameters(),
            lr=classifier_lr,
            eps=classifier_eps,
            weight_decay=weight_decay if classifier_weight_decay is None else classifier_weight_decay,
            fused=fused,
        )
    return vae_opt, cls_opt


def vae_objective(
    module: MultiVAE,
    classifier: torch.nn.Module | None,
    batch: dict,
    kl_weight: float,
    kappa: float = 1.0,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossOutput, torch.Tensor]:
    """(total loss to backpropagate, the module's LossOutput, the fool term before kappa)."""
    out = module.loss(batch, kl_weight=kl_weight, eps=eps)
    total = out.loss
    adversarial = torch.zeros((), dtype=total.dtype, device=total.device)
    if classifier is not None and kappa > 0:
        adversarial = fool_loss(classifier(out.z), batch[keys.BATCH])
        total = total + kappa * adversarial
    return total, out, adversarial


def classifier_objective(
    classifier: torch.nn.Module, z: torch.Tensor, batch_codes: torch.Tensor, kappa: float = 1.0
) -> torch.Tensor:
    """kappa * cross-entropy of the true batch, on a detached z (no gradient reaches the VAE)."""
    return kappa * true_batch_loss(classifier(z.detach()), batch_codes)


def train_step(
    module: MultiVAE,
    classifier: torch.nn.Module | None,
    vae_opt: torch.optim.Optimizer,
    cls_opt: torch.optim.Optimizer | None,
    batch: dict,
    kl_weight: float,
    kappa: float = 1.0,
    eps: torch.Tensor | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One reference-order step; returns every loss term as a float (batch means for per-cell terms).

    ``amp_dtype``: run the VAE forward under autocast to that dtype (as ``dist.precision`` does in the
    trainer, ``trainer/parallel.py``); backward, the optimizer steps and the classifier (which always
    computes in its own dtype, ``trainer/classifier.py``) stay outside it.
    """
    if amp_dtype == torch.float16:
        # fp16 gradients underflow to zero (and overflow to inf) without loss scaling, which this plain step
        # does not do; the trainer's dist.precision=fp16 (DDP on a GPU) runs a GradScaler
        raise ValueError("train_step(amp_dtype=torch.float16) has no loss scaling: use torch.bfloat16, or "
                         "dist.precision=fp16 with the trainer (dist.backend=ddp, GradScaler)")
    device = next(module.parameters()).device.type
    with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None):
        total, out, adversarial = vae_objective(module, classifier, batch, kl_weight, kappa, eps)
    vae_opt.zero_grad()
    total.backward()
    vae_opt.step()
    cls_value = torch.zeros(())
    if classifier is not None and cls_opt is not None and kappa > 0:
        cls_loss = classifier_objective(classifier, out.z, batch[keys.BATCH], kappa)
        cls_opt.zero_grad()
        cls_loss.backward()
        cls_opt.step()
        cls_value = cls_loss.detach()
    # one stacked transfer instead of seven .item() syncs
    vals = torch.stack(
        [t.detach().to(torch.float64).mean() for t in (out.recon_rna, out.recon_atac, out.kl, out.penalty)]
        + [adversarial.detach().double(), cls_value.double().to(total.device), total.detach().double()]
    ).tolist()
    names = ("recon_rna", "recon_atac", "kl", "penalty", "adversarial", "classifier", "loss")
    return dict(zip(names, vals, strict=True))
