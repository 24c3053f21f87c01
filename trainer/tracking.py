"""What a run learns from its tracked validations: the best monitored value and where it was reached
(keep=best, model.json), the patience count (early stopping) and the learning-rate plateau count.

Two "best"s, as Lightning keeps them: ``best`` is the lowest monitored value (keep=best ships its weights,
like ModelCheckpoint), while early stopping counts patience against the last value that beat its own
reference by more than ``run.min_delta`` (like EarlyStopping). With min_delta = 0 they are the same; with
min_delta > 0 a run improving in small steps still ships its lowest-validation weights.

All of it is checkpointed (flat keys of trainer.pt, as the loop always wrote them), so a resumed run takes
the decisions the uninterrupted one takes. Every decision goes through a collective: all ranks stop, and
change the rate, at the same validation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from trainer import checkpoint_checks as checks
from trainer import dist
from trainer.config import TrainConfig
from trainer.schedules import LrPlateau


class ValidationTracker:
    def __init__(self, cfg: TrainConfig) -> None:
        self.run_cfg, self.optim_cfg = cfg.run, cfg.optim
        o = cfg.optim
        self.plateau = LrPlateau(o.lr, o.lr_factor, o.lr_patience, o.lr_threshold, o.lr_min) \
            if o.reduce_lr_on_plateau else None
        self.best: float | None = None  # lowest monitored value (None: no finite validation yet)
        self.stopping_best: float | None = None  # early stopping's reference: improved on by > min_delta
        self.bad_epochs = 0  # tracked validations since the last improvement by > min_delta
        self.best_info: dict = {}  # epochs, steps and validation of the best weights (model.json with keep=best)

    def update(self, val: dict[str, float], epoch: int, step: int) -> tuple[bool, bool]:
        """Count one tracked validation: (a new lowest value: keep=best saves these weights, stop early).
        Lowers ``self.plateau.lr`` when due; the caller writes it into the optimizer. Collective: every
        rank calls it."""
        r = self.run_cfg
        value = val[r.monitor]
        # a NaN validation would become `best` for good (nothing compares below NaN): it counts as no
        # improvement instead, and the run says so
        if not math.isfinite(value):
            dist.print0(f"[train] warning: {r.monitor} is {value} after epoch {epoch}: not an improvement")
        lowest = math.isfinite(value) and (self.best is None or value < self.best)
        if lowest:
            self.best = value
            self.best_info = {"epochs": epoch + 1, "steps": step, "validation": dict(val)}
        if math.isfinite(value) and (self.stopping_best is None or value < self.stopping_best - r.min_delta):
            self.stopping_best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        stop = False
        if r.early_stopping and dist.shared_decision(self.bad_epochs >= r.patience):
            # best is None when no validation so far was finite (it crashed formatting None)
            best_text = "none: no validation was finite" if self.best is None else f"{self.best:.4f}"
            n = self.bad_epochs
            dist.print0(f"[train] early stopping after epoch {epoch}: no {r.monitor} improvement "
                        f"> {r.min_delta} for {n} validation{'s' if n != 1 else ''} (best {best_text})")
            stop = True
        if self.plateau is not None:
            o = self.optim_cfg
            lowered = self.plateau.step(val[o.lr_scheduler_metric])
            # rank 0's count on every rank (the validation is all-reduced: the same numbers anyway)
            self.plateau.load_state_dict(dist.broadcast_object(self.plateau.state_dict()))
            if lowered:
                n = o.lr_patience + 1
                dist.print0(f"[train] learning rate lowered to {self.plateau.lr:.3g} after epoch {epoch}: no "
                            f"{o.lr_scheduler_metric} improvement for {n} validation{'s' if n > 1 else ''}")
        return lowest, stop

    def state_dict(self) -> dict[str, Any]:
        return {"best": "" if self.best is None else self.best, "bad_epochs": self.bad_epochs,
                "stopping_best": "" if self.stopping_best is None else self.stopping_best,
                "best_info": self.best_info, "lr_plateau": {} if self.plateau is None else self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any], path: str) -> None:
        """From a checkpoint's trainer state (``path`` names it in the error for a missing key)."""
        checks.require_keys(state, ("best", "bad_epochs"), Path(path) / "trainer.pt")
        self.best = None if state["best"] == "" else float(state["best"])
        # a checkpoint written before the two were told apart held one value, early stopping's
        stopping = state.get("stopping_best", state["best"])
        self.stopping_best = None if stopping == "" else float(stopping)
        self.bad_epochs = int(state["bad_epochs"])
        self.best_info = dict(state.get("best_info", {}))  # absent before it was recorded
        if self.plateau is not None:  # (its settings are the checkpoint's: check_same_settings)
            checks.require_keys(state, ("lr_plateau",), Path(path) / "trainer.pt")
            self.plateau.load_state_dict(state["lr_plateau"])
