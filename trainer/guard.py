"""Numerical safety: a non-finite loss or gradient skips the step on EVERY rank and is counted;
after ``max_bad_steps`` consecutive bad steps the run stops with a message naming the step, the loss
term that went bad and the last good checkpoint.

The decision is all-reduced (``dist.any_rank``), so one rank seeing a NaN never leaves the others
stepping alone (that would desynchronise the weights and then hang the next collective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from trainer import dist


class NonFiniteError(RuntimeError):
    """Raised (on every rank) after too many consecutive non-finite steps."""


def bad_terms(terms: dict[str, torch.Tensor | float]) -> list[str]:
    """Names of the loss terms that are not finite on this rank."""
    bad = []
    for name, value in terms.items():
        if isinstance(value, torch.Tensor):
            finite = bool(torch.isfinite(value.detach()).all())
        else:  # plain floats (the loop's stacked values): no tensor round trip per term
            finite = math.isfinite(float(value))
        if not finite:
            bad.append(name)
    return bad


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def name_bad_terms(per_rank: list[list[str]]) -> str:
    """What went bad, from every rank's list of bad terms: ``recon_rna, loss on rank 1`` (one process: the
    terms alone). Ranks that saw the same terms are named together (``grad_norm on ranks 0, 1``)."""
    if len(per_rank) == 1:
        return ", ".join(per_rank[0])
    groups: dict[str, list[int]] = {}
    for rank, names in enumerate(per_rank):
        if names:
            groups.setdefault(", ".join(names), []).append(rank)
    return "; ".join(f"{names} on {_ranks(ranks)}" for names, ranks in groups.items())


def name_classifier_losses(per_rank: list[float]) -> str:
    """The classifier's loss as every rank saw it: the ranks where it was not finite, else its value(s)."""
    bad = [r for r, v in enumerate(per_rank) if not math.isfinite(v)]
    if len(per_rank) == 1:
        return f"classifier loss {per_rank[0]:.4g}"
    if bad:
        return f"classifier loss {per_rank[bad[0]]} on {_ranks(bad)}"
    return "classifier loss " + ", ".join(f"{v:.4g}" for v in per_rank)


@dataclass
class StepGuard:
    max_bad_steps: int = 5
    consecutive: int = 0
    skipped_total: int = 0
    last_good_checkpoint: str | None = None
    history: list[str] = field(default_factory=list)
    classifier_consecutive: int = 0  # the adversarial classifier's steps skipped in a row (its own streak)
    classifier_skipped: int = 0

    def check(self, step: int, terms: dict[str, torch.Tensor | float], streak: bool = True) -> bool:
        """Collective. True if the step must be skipped on every rank (some rank saw a bad term).

        A passing check does not end a streak of bad steps: a step is checked more than once (loss
        terms, then the gradient norm), and a finite loss with a NaN gradient must still count as one
        more bad step in a row. Only :meth:`step_taken` (the optimizer stepped) resets the streak.
        ``streak=False``: an expected skip (an fp16 loss-scale overflow while the scaler backs off) is
        counted in ``skipped_total`` but not toward ``max_bad_steps``."""
        local_bad = bad_terms(terms)
        skip = dist.any_rank(bool(local_bad))
        if not skip:
            return False
        self.consecutive += int(streak)
        self.skipped_total += 1
        # every rank is here (the skip was all-reduced): gather what each saw, so the line rank 0 prints and
        # the error every rank raises name the term even when only another rank saw it
        what = name_bad_terms(dist.gather_objects(local_bad))
        self.history.append(f"step {step}: non-finite {what}")
        why = "" if streak else "; a loss-scale overflow: the scale backs off, not counted as a bad step"
        dist.print0(f"[guard] skipping step {step}: non-finite {what} "
                    f"({self.consecutive} in a row, {self.skipped_total} in total{why})")
        if streak and self.consecutive >= self.max_bad_steps:
            raise NonFiniteError(
                f"stopping at step {step}: {self.consecutive} consecutive non-finite steps "
                f"(last bad: {what}; see run.max_bad_steps). Last good checkpoint: "
                f"{self.last_good_checkpoint or 'none written yet'}")
        return True

    def check_classifier(self, step: int, grad_norm: float, loss: torch.Tensor | float) -> bool:
        """True if the adversarial classifier's step must be skipped: the norm of its rank-averaged gradient is
        not finite. That norm is the same on every rank (a NaN or inf on one rank reaches all through the
        average), so every rank decides alike without another collective; ``loss`` (this rank's) only names
        what went bad. Unchecked, one such step turned every classifier weight into NaN, after which every VAE
        step had a NaN fool term and was skipped until the run stopped, blaming "adversarial, loss".

        Its streak is its own (the VAE step of the same minibatch was taken, which ends the VAE's streak):
        ``max_bad_steps`` classifier skips in a row stop the run naming the classifier."""
        if math.isfinite(grad_norm):
            self.classifier_consecutive = 0
            return False
        self.classifier_consecutive += 1
        self.classifier_skipped += 1
        # the norm is the same everywhere, so every rank is here: which rank's loss went bad is worth one
        # gather on this (rare) path; rank 0's own finite loss alone misled
        what = f"{name_classifier_losses(dist.gather_objects(float(loss)))}, classifier grad_norm {grad_norm}"
        self.history.append(f"step {step}: non-finite {what}")
        dist.print0(f"[guard] skipping the adversarial classifier's step {step}: non-finite {what} "
                    f"({self.classifier_consecutive} in a row, {self.classifier_skipped} in total)")
        if self.classifier_consecutive >= self.max_bad_steps:
            raise NonFiniteError(
                f"stopping at step {step}: {self.classifier_consecutive} consecutive non-finite steps of the "
                f"adversarial classifier (last bad: {what}; see run.max_bad_steps). Last good checkpoint: "
                f"{self.last_good_checkpoint or 'none written yet'}")
        return True

    def step_taken(self) -> None:
        """The step passed every check and the optimizer stepped: the streak of bad steps ends."""
        self.consecutive = 0

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total,
                "last_good_checkpoint": self.last_good_checkpoint or "",
                "classifier_consecutive": self.classifier_consecutive, "classifier_skipped": self.classifier_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state["consecutive"])
        self.skipped_total = int(state["skipped_total"])
        self.last_good_checkpoint = state["last_good_checkpoint"] or None
        # absent in checkpoints written before the classifier was guarded
        self.classifier_consecutive = int(state.get("classifier_consecutive", 0))
        self.classifier_skipped = int(state.get("classifier_skipped", 0))
