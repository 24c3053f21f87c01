"""The epoch's training terms per cell, over every taken step and every rank: the ``train_epoch`` record.

Train records sample single steps (every ``logger.log_every``-th); a scientist comparing training with
validation (over-fitting, the reference's ``history["elbo_train"]``) needs the epoch's mean over all its
cells. Each rank adds ``n * mean`` of its taken steps (skipped steps add nothing) and one float64
all-reduce at the epoch end gives exact per-cell means, as validation aggregates (never a mean of means).
The keys mirror validation's: ``elbo_train`` and ``reconstruction_loss_train`` are the same quantities as
``elbo_validation`` and ``reconstruction_loss_validation``, computed on the training batches as they were
trained (dropout on, the step's noise). The sums are part of a mid-epoch checkpoint, so a resumed epoch
reports what the uninterrupted one does.
"""

from __future__ import annotations

from typing import Any

from trainer import dist

_SUMS = ("recon", "elbo", "kl", "loss")


class EpochTotals:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(_SUMS, 0.0)
        self.cells = 0  # this rank's cells in taken steps
        self.steps = 0  # taken steps (the same on every rank: a skip is decided for all)

    def add(self, values: dict[str, float], n_cells: int) -> None:
        """One taken step: ``values`` are this rank's batch means (``train_one_step``'s), ``n_cells`` its size."""
        recon = values["recon_rna"] + values["recon_atac"]
        for key, v in (("recon", recon), ("elbo", recon + values["kl"] + values["penalty"]),
                       ("kl", values["kl"]), ("loss", values["loss"])):
            self.sums[key] += v * n_cells
        self.cells += n_cells
        self.steps += 1

    def record(self) -> dict[str, float]:
        """The epoch's per-cell means over all ranks ({} without a taken step). Collective: every rank calls it."""
        tot = dist.all_reduce_sums({**self.sums, "n": float(self.cells)})
        if tot["n"] == 0:
            return {}
        n = tot["n"]
        return {"reconstruction_loss_train": tot["recon"] / n, "elbo_train": tot["elbo"] / n,
                "kl_train": tot["kl"] / n, "loss_train": tot["loss"] / n, "n_train": n, "steps_train": self.steps}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "cells": self.cells, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """``None`` (a checkpoint written before these sums were kept): the epoch's record then covers the
        steps after the resume only, as its ``n_train`` / ``steps_train`` show."""
        self.reset()
        if state:
            self.sums = {k: float(state["sums"][k]) for k in _SUMS}
            self.cells, self.steps = int(state["cells"]), int(state["steps"])
