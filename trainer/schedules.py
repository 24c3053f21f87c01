"""Training schedules: the KL warm-up as a pure function (no state, so every rank and a resumed run
agree), and the learning-rate plateau rule as plain state that the checkpoint carries."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def kl_weight(
    epoch: int,
    step: int = 0,
    n_epochs_kl_warmup: int | None = 50,
    n_steps_kl_warmup: int | None = None,
    min_kl_weight: float = 0.0,
    max_kl_weight: float = 1.0,
) -> float:
    """KL warm-up weight: linear from ``min`` to ``max`` over epochs (default) or steps.

    Same rule as the reference (spec §3.6): the epoch schedule wins when both are given, it is constant
    within an epoch, the step schedule applies only when ``n_epochs_kl_warmup`` is None, and with
    neither the weight is ``max_kl_weight``.

    ``step`` counts minibatches (optimizer steps of the VAE), as the reference documents it. The reference
    itself passes Lightning's ``global_step``, which under its manual optimisation counts every optimizer
    step: with the adversarial classifier on (MULTIVI's default with > 1 batch) it advances by 2 per
    minibatch, so there ``n_steps_kl_warmup=N`` reaches full weight after N/2 minibatches (measured with
    scvi-tools 1.5.1: weight 0.1 at minibatch 1 for N=20); here it takes N. Pass N/2 to reproduce such a run.
    """
    if epoch < 0 or step < 0:
        raise ValueError(f"epoch and step must be >= 0, got {epoch}, {step}")
    if min_kl_weight > max_kl_weight:
        raise ValueError(f"min_kl_weight {min_kl_weight} > max_kl_weight {max_kl_weight}")
    span = max_kl_weight - min_kl_weight
    if n_epochs_kl_warmup:
        if epoch < n_epochs_kl_warmup:
            return min_kl_weight + span * (epoch / n_epochs_kl_warmup)
    elif n_steps_kl_warmup and step < n_steps_kl_warmup:
        return min_kl_weight + span * (step / n_steps_kl_warmup)
    return max_kl_weight


@dataclass
class LrPlateau:
    """The reference's ``reduce_lr_on_plateau`` (scvi-tools: torch's ``ReduceLROnPlateau`` with mode min,
    ``threshold_mode="abs"``, no cooldown, stepped after every validation) as plain numbers: the same
    arithmetic as torch's class (tested against it), but backend-free -- the loop writes the rate into
    whichever optimizer the backend holds (DeepSpeed's wraps the client one) -- and saved in the
    checkpoint, so a resumed run counts the same validations without improvement as the uninterrupted one.

    A validation counts as an improvement when it is below ``best - threshold``; after more than
    ``patience`` validations in a row without one, the rate is multiplied by ``factor`` (not below
    ``min_lr``; a change under 1e-8 is not made, as torch) and the count restarts. A NaN validation is
    never an improvement."""

    lr: float
    factor: float = 0.6
    patience: int = 30
    threshold: float = 0.0
    min_lr: float = 0.0
    best: float = math.inf
    bad: int = 0

    def step(self, value: float) -> bool:
        """Count one validation; True when it lowered ``lr``."""
        if value < self.best - self.threshold:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.bad <= self.patience:
            return False
        self.bad = 0
        new = max(self.lr * self.factor, self.min_lr)
        if self.lr - new > 1e-8:  # torch's eps: a smaller change is not made
            self.lr = new
            return True
        return False

    def state_dict(self) -> dict[str, float | int]:
        return {k: v for k, v in asdict(self).items() if k in ("lr", "best", "bad")}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best, self.bad = float(state["lr"]), float(state["best"]), int(state["bad"])
