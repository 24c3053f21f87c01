"""Where a training run starts: step 0, or the place of the checkpoint ``run.resume`` picks.

A checkpoint is checked against this run before anything is loaded from it (same data, same cells, the
settings that change the numbers, the weights' dtype; trainer/checkpoint_checks.py, resume_settings.py),
then restores the weights and optimizers, every RNG, the data stream's position inside the epoch, the
epoch's running training sums, the guard's counts and the validation tracker: the continued run takes the
same steps as the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data.store import StoreMeta
from data.stream import StoreStream
from trainer import checkpoint as ckpt
from trainer import checkpoint_checks as checks
from trainer import dist, query
from trainer.config import TrainConfig
from trainer.epoch_totals import EpochTotals
from trainer.guard import StepGuard
from trainer.parallel import Wrapped
from trainer.resume_settings import check_same_settings, rounding_changes
from trainer.tracking import ValidationTracker


@dataclass
class Position:
    """The loop's counters where it starts (a fresh run: all zero)."""

    epoch: int = 0
    step: int = 0
    batches_done: int = 0  # batches of ``epoch`` already trained (a mid-epoch checkpoint)
    stopped: bool = False
    stop_reason: str = ""  # "early" (early stopping) | "max_steps": a larger run.max_steps continues the run
    last_val: dict[str, float] = field(default_factory=dict)  # kept in checkpoints: a finished run re-exports it


def resume(cfg: TrainConfig, info: dist.DistInfo, ref: query.Reference | None, meta: StoreMeta, cells: str,
           code: str, w: Wrapped, train_stream: StoreStream, tracker: ValidationTracker, guard: StepGuard,
           totals: EpochTotals) -> Position:
    """Find, check and load the checkpoint ``cfg.run.resume`` names (every rank; collectives inside), into
    ``w``, ``train_stream``, ``tracker``, ``guard`` and ``totals``; the loop's counters are returned."""
    run_dir = Path(cfg.run.output_dir)
    weights_dtype = next(w.module.parameters()).dtype
    pos = Position()
    path = dist.broadcast_object(str(ckpt.find_resume(run_dir, cfg.run.resume) or ""))
    query.check_resumable(ref, path, run_dir, info.is_main)
    if path:
        state, rank_state = ckpt.load_states(path, info.rank, info.world_size)
        # what this loop reads, named in one line if a checkpoint of other code or a damaged one lacks it
        checks.require_keys(state, ("epoch", "step", "batches_done", "stopped", "guard"),
                          Path(path) / "trainer.pt")
        checks.require_keys(rank_state, ("rng", "stream"), Path(path) / f"rank_{info.rank}.pt")
    if cfg.run.resume != "auto":  # resume=none starts from step 0, a given checkpoint from its own step
        ckpt.refuse_newer_checkpoints(run_dir, cfg.run.resume, int(state["step"]) if path else 0)
    if path:
        checks.check_same_data(state, meta, path, cfg.data.store, cells)
        check_same_settings(state.get("config"), cfg, path)  # after the store: another store says that first
        checks.check_weights_dtype(state, path, weights_dtype)
        try:
            w.load(Path(path))
        except RuntimeError as exc:  # shapes differ (a checkpoint from before the data fingerprint)
            raise checks.CheckpointError(f"checkpoint {path} does not fit this model / data.store="
                                       f"{cfg.data.store}: {str(exc).splitlines()[0]}") from None
        ckpt.set_rng_state(rank_state["rng"])
        pos.epoch, pos.step, pos.batches_done = int(state["epoch"]), int(state["step"]), int(state["batches_done"])
        pos.stopped = bool(state["stopped"])
        tracker.load_state_dict(state, path)
        if tracker.plateau is not None:
            w.set_lr(tracker.plateau.lr)
        pos.stop_reason = str(state.get("stop_reason", "early" if pos.stopped else ""))  # absent before it was recorded
        pos.last_val = {k: float(v) for k, v in state.get("last_validation", {}).items()}
        if pos.stop_reason == "max_steps" and (cfg.run.max_steps is None or pos.step < cfg.run.max_steps):
            pos.stopped, pos.stop_reason = False, ""  # the limit was raised (or lifted): train on from here
        if not pos.stopped and cfg.run.max_steps is not None and pos.step >= cfg.run.max_steps:
            # resumed at or past a (lowered) limit: the loop checks it only after a step, one step too many
            pos.stopped, pos.stop_reason = True, "max_steps"
        guard.load_state_dict(state["guard"])
        guard.last_good_checkpoint = path
        checks.warn_if_threads_differ(state, path)
        if changed := rounding_changes(state.get("config"), cfg):
            dist.print0(f"[train] note: resuming {path} with {', '.join(changed)}: the same math in other kernels; "
                        f"the run continues, but not bit for bit as the uninterrupted run would have")
        if state.get("code_fingerprint", code) != code:  # absent in checkpoints written before it was recorded
            dist.print0(f"[train] note: {path} was written by other trainer/loader code or another torch "
                        f"version: the run continues, but not bit for bit as the uninterrupted run would have")
        if pos.batches_done:
            train_stream.set_epoch(pos.epoch)
            train_stream.load_state_dict(rank_state["stream"])
            totals.load_state_dict(rank_state.get("epoch_totals"))  # absent in checkpoints from before the record
        dist.print0(f"[train] resumed from {path} (epoch {pos.epoch}, step {pos.step})")
        if pos.epoch >= cfg.run.epochs and not pos.stopped:  # a finished run re-exported, or run.epochs set below it
            dist.print0(f"[train] nothing left to train: the checkpoint is at epoch {pos.epoch}, run.epochs="
                        f"{cfg.run.epochs}; exporting it as it stands")
        elif pos.stopped and pos.stop_reason == "early" and pos.epoch < cfg.run.epochs:  # a larger run.epochs cannot undo it
            dist.print0(f"[train] nothing left to train: the run stopped early at epoch {pos.epoch} (run.early_stopping, "
                        f"patience {cfg.run.patience}); exporting it as it stands (a new run.output_dir trains anew)")
    if info.is_main and cfg.run.keep == "best":
        # best/ holds what the checkpoint this run continues from held, and nothing else: the weights
        # travel with it (a resume into another run directory still exports them), and a file written
        # after it (a killed attempt's later epoch) or by an earlier run (resume=none) is removed, else a
        # run without a tracked validation of its own (a max_steps stop in epoch 0) exported those weights
        ckpt.restore_best(run_dir, state.get("best_weights") if path else {})
    return pos
