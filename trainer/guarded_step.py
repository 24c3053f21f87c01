"""One guarded training step of the loop: forward, the non-finite guard, backward, step, then the adversary.

Kept apart from the loop (trainer/loop.py) because tests and the semantics trace drive it directly, on
every backend (trainer/parallel.py ``Wrapped``), with their own batches.
"""

from __future__ import annotations

import math

import torch

from data import keys
from trainer.guard import StepGuard
from trainer.parallel import Wrapped


def train_one_step(w: Wrapped, batch: dict, kl_weight: float, eps: torch.Tensor | None, guard: StepGuard,
                   step: int, share: float | None = None) -> dict[str, float] | None:
    """Forward, guard, backward, step of the VAE, then the adversary's step. None if skipped.

    ``share`` (``RankSlice.share``, trainer/global_batch.py): this rank's weight in the ranks' average of
    gradients when the ranks' batches differ in size; the returned terms are the batch's own means.

    A skipped step must leave no trace: batch-norm running statistics (classifier, optional VAE batch
    norm) are updated by the forward itself, so they are snapshotted and restored on a skip;
    otherwise one NaN batch would poison them for the rest of the run.
    """
    buffers = w.buffers()
    saved = [b.detach().clone() for b in buffers]

    def skip() -> None:
        w.on_skip()
        w.zero_grad()
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)

    # NaN anywhere in the forward comes out as a NaN term (the ATAC likelihoods are our own kernels: torch's
    # F.binary_cross_entropy raised on NaN probabilities on the CPU and was a device-side assert on CUDA)
    total, out, adversarial = w.forward(batch, kl_weight, eps)
    terms = {"recon_rna": out.recon_rna.mean(), "recon_atac": out.recon_atac.mean(), "kl": out.kl.mean(),
             "penalty": out.penalty.mean(), "adversarial": adversarial, "loss": total,
             **({} if out.kl_library is None else {"kl_library": out.kl_library.mean()})}  # lognormal: also in kl
    values = dict(zip(terms, torch.stack([t.detach().double() for t in terms.values()]).tolist(), strict=True))
    w.zero_grad()
    if guard.check(step, values):
        skip()
        return None
    w.backward(total if share is None else total * share)
    norm = w.grad_norm_before_step()
    # the same norm on every rank (all-reduced gradients), so every rank takes the same branch
    backoff = norm is not None and not math.isfinite(norm) and w.scale_backing_off()
    if norm is not None and guard.check(step, {"grad_norm": norm}, streak=not backoff):
        skip()
        return None
    w.step()
    if norm is None:
        # backends that know the norm only inside their step (DeepSpeed ZeRO 1/2) skip a non-finite
        # one there themselves; the guard still counts it, and the classifier must not step either
        norm = w.grad_norm_after_step()
        if norm is not None and guard.check(step, {"grad_norm": norm}):
            skip()
            return None
    guard.step_taken()
    values["grad_norm"] = float("nan") if norm is None else norm
    if w.classifier is not None:
        values["classifier"] = float(w.classifier_step(out.z, batch[keys.BATCH], guard, step, share))
    return values
