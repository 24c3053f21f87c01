"""Adversarial batch classifier on the joint latent (spec §4.2).

Same layers as the reference's ``Classifier(n_input=n_latent, n_hidden=32, n_labels=n_batch,
n_layers=2, logits=True)``: two blocks Linear -> BatchNorm1d(mom 0.01, eps 1e-3) -> ReLU -> Dropout(0.1),
then a Linear to the batch logits. The module is only built when there is more than one batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from trainer.nn import FCStack, head


class BatchClassifier(nn.Module):
    def __init__(
        self, n_latent: int, n_batch: int, n_hidden: int = 32, n_layers: int = 2, dropout: float = 0.1
    ):
        super().__init__()
        if n_batch < 2:
            raise ValueError(f"the adversarial classifier needs n_batch >= 2, got {n_batch}")
        self.n_batch = n_batch
        self.hidden = FCStack(
            n_latent, n_hidden, n_layers, activation="relu", dropout=dropout, batch_norm=True
        )
        self.out = nn.Linear(n_hidden, n_batch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Batch logits (B, n_batch), always computed in the parameters' dtype.

        Outside any autocast because a 10-32-32-2 net gains nothing from bf16 GEMMs: under CPU autocast
        the casts around its six tiny matmuls made the adversary's share of a batch-128 step 2.2 ms
        instead of 1.6 ms (measured, outputs/prof/phases.py); and its logits feed a cross-entropy.
        """
        with torch.autocast(z.device.type, enabled=False):
            return head(self.out, self.hidden(z.to(self.out.weight.dtype)))


def build_classifier(module: nn.Module, adversarial: bool = True) -> BatchClassifier | None:
    """The reference's rule: adversarial mixing only when enabled and there is more than one batch.

    Built on the module's device and in its dtype: a caller that steps it without ``wrap`` (which moves both)
    got a CPU classifier next to a CUDA module (scripts/bench/gpu_step.py: "Expected all tensors to be on the
    same device" at the first step)."""
    if not adversarial or module.n_batch < 2:
        return None
    device = next(module.parameters()).device
    return BatchClassifier(module.n_latent, module.n_batch).to(device=device, dtype=module.dtype)


def fool_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean over cells of cross-entropy against the uniform distribution over the *wrong* batches."""
    n = logits.shape[1]
    target = 1.0 - F.one_hot(batch.reshape(-1).long(), n).to(logits.dtype)
    return -(F.log_softmax(logits, dim=1) * (target / (n - 1))).sum(dim=1).mean()


def true_batch_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the true batch (the classifier's own objective)."""
    target = F.one_hot(batch.reshape(-1).long(), logits.shape[1]).to(logits.dtype)
    return -(F.log_softmax(logits, dim=1) * target).sum(dim=1).mean()
