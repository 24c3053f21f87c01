"""The training loop, read top to bottom:

build -> resume -> for epoch: for batch: step -> log -> [checkpoint] ; validate -> early stop -> checkpoint
-> export.

Backend differences live in ``trainer/parallel.py``; rank handling in ``trainer/dist.py``; the loop
itself never branches on either. Every rank runs the same code and takes the same decisions because
every decision that could differ (skip a step, stop) goes through a collective.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from data import keys
from data.cache import ReplayCache
from data.cell_table import cells_fingerprint
from data.collate import to_device
from data.retry import STATS as read_stats
from data.retry import reset_stats as reset_read_stats
from data.store import open_store
from trainer import checkpoint as ckpt
from trainer import checkpoint_checks as checks
from trainer import dist, query
from trainer.alloc import reuse_large_allocations
from trainer.classifier import build_classifier
from trainer.config import ConfigError, TrainConfig, config_to_json, validation_readers
from trainer.epoch_totals import EpochTotals
from trainer.export import TRAINING_STORE, build_module, export_model
from trainer.global_batch import EpochSlices, step_noise
from trainer.guard import StepGuard
from trainer.guarded_step import train_one_step
from trainer.library_prior import set_prior as set_library_prior
from trainer.lock import LockError
from trainer.lock import acquire as acquire_lock
from trainer.metrics import MetricsWriter, StepClock, memory_mb
from trainer.parallel import wrap
from trainer.resume_run import resume
from trainer.schedules import kl_weight as kl_schedule
from trainer.streams import EpochLoader, check_last_batch, make_stream
from trainer.tracking import ValidationTracker
from trainer.validation import validate, warn_if_collapsed

VALIDATION_KEYS = ("reconstruction_loss_validation", "elbo_validation")
# the per-cell means a train record reports for the global batch (grad_norm is already global)
TRAIN_TERMS = ("recon_rna", "recon_atac", "kl", "kl_library", "penalty", "adversarial", "loss", "classifier")


@dataclass
class TrainResult:
    run_dir: str
    model_dir: str | None  # exported model (rank 0); None on other ranks
    epochs: int  # epochs completed
    steps: int  # optimizer steps taken (skipped ones included in the count)
    stopped_early: bool
    best: float | None  # best monitored validation value
    skipped_steps: int
    last_validation: dict[str, float]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_stats_all_ranks() -> dict[str, int]:
    """The store read counters summed over ranks (each rank counts only its own reads: rank 0's alone were
    reported as the run's). Collective: every rank must call it."""
    return {k: int(v) for k, v in dist.all_reduce_sums({k: float(v) for k, v in read_stats.as_dict().items()}).items()}


def run(cfg: TrainConfig) -> TrainResult:
    """One training run. Rank 0 holds an exclusive lock on ``run.output_dir`` for the whole run, so a
    second job on the same directory stops before it reads or writes anything (trainer/lock.py)."""
    info = dist.init_distributed(cfg.dist.timeout_s, single_group=cfg.dist.backend == "deepspeed",
                                 device=cfg.dist.device, device_key="dist.device")
    lock, error = None, ""
    fresh_dir = not Path(cfg.run.output_dir).exists()
    if info.is_main:
        try:
            lock = acquire_lock(cfg.run.output_dir, "mva-train", clear_stale=cfg.run.clear_stale_lock)
        except LockError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)  # every rank stops, not only rank 0
    if error:
        raise LockError(error)
    try:
        return _run(cfg, info)
    finally:
        if lock is not None:
            lock.release()
            if fresh_dir:  # a run refused at start-up leaves no empty directory (only its lock was there)
                with contextlib.suppress(OSError):
                    Path(cfg.run.output_dir).rmdir()


def _run(cfg: TrainConfig, info: dist.DistInfo) -> TrainResult:
    run_dir = Path(cfg.run.output_dir)
    reuse_large_allocations()  # big per-step temporaries reuse freed heap memory (trainer/alloc.py)
    reset_read_stats()  # the read retry counters this run reports are its own
    if cfg.run.early_stopping and cfg.run.monitor not in VALIDATION_KEYS:
        raise ConfigError(f"run.monitor must be one of {VALIDATION_KEYS}, got {cfg.run.monitor!r}")
    if cfg.data.remainder == "none" and info.world_size > 1:
        # ranks would get different numbers of batches and the collectives of the last step would hang
        raise ConfigError(f"data.remainder=none needs one process, got world_size {info.world_size}: "
                          "use drop or pad")

    # ---- build (same seed on every rank: identical initial weights before any broadcast)
    seed_everything(cfg.run.seed)
    store = open_store(cfg.data.store)
    meta = store.meta
    cfg, model_meta, ref = query.for_query(cfg, meta)  # model_meta: the store's, or a query's extended categories
    module = build_module(model_meta, cfg)
    set_library_prior(module, store, model_meta.batch_categories)  # a query's reference batches: the reference's
    if ref is not None:
        query.start(module, ref, cfg.query)
    classifier = build_classifier(module, cfg.optim.adversarial)
    w = wrap(module, classifier, cfg.optim, cfg.dist, info.device, cfg.data.batch_size)
    weights_dtype = next(module.parameters()).dtype  # bf16 where DeepSpeed casts the module, else fp32
    seed_everything(cfg.run.seed + 1 + info.rank)  # per-rank streams for dropout
    train_stream = make_stream(store, cfg, "train", info)
    val_inner = make_stream(store, cfg, "validation", info)
    if ref is not None:
        query.adapt_streams([train_stream, val_inner], meta, model_meta, ref)
    o = cfg.optim
    if cfg.run.validate_every_epochs and (cfg.run.early_stopping or cfg.run.keep == "best" or o.reduce_lr_on_plateau) \
            and not val_inner.eligible.any():  # the same on every rank: all stop here
        readers, fixes = validation_readers(cfg.run.early_stopping, cfg.run.keep, o.reduce_lr_on_plateau)
        raise ConfigError(f"the validation split of {cfg.data.store} is empty (data.val_fraction="
                          f"{cfg.data.val_fraction}), but {readers} it: set {fixes}, or raise data.val_fraction")
    val_stream = ReplayCache(val_inner, cfg.data.cache_validation_mb * 2**20)
    check_last_batch(train_stream, cfg, classifier is not None)
    guard = StepGuard(max_bad_steps=cfg.run.max_bad_steps)

    # ---- resume
    code = checks.code_fingerprint()  # at start, close to when the modules were imported
    cells = cells_fingerprint(store)  # which cells, in which order: checked at resume, recorded in checkpoints
    tracker = ValidationTracker(cfg)  # best, patience and learning-rate plateau counts
    totals = EpochTotals()  # the epoch's training terms per cell: the train_epoch record
    pos = resume(cfg, info, ref, meta, cells, code, w, train_stream, tracker, guard, totals)
    epoch, step, batches_done, stopped, stop_reason = pos.epoch, pos.step, pos.batches_done, pos.stopped, pos.stop_reason
    last_val = pos.last_val  # the last validation (kept in checkpoints: a finished run re-exports it)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # tmp + rename: a full disk must not truncate the config.yaml of the run being resumed
        tmp_cfg = run_dir / ".config.yaml.tmp"
        tmp_cfg.write_text(OmegaConf.to_yaml(OmegaConf.create(asdict(cfg))))
        tmp_cfg.replace(run_dir / "config.yaml")
    metrics = MetricsWriter(run_dir, enabled=info.is_main, wandb_mode=cfg.logger.wandb_mode,
                            project=cfg.logger.project, tags=cfg.logger.tags, config=asdict(cfg),
                            # a fresh start is step 0: the records of an attempt killed before its first
                            # checkpoint (or of an earlier run) are dropped, not followed by a second step 1
                            resume_step=step)
    plan = train_stream.plan()  # how many training cells an epoch sees (drop leaves some out, pad repeats some)
    left = f", {plan.n_dropped} left out" if plan.n_dropped else f", {plan.n_padded} repeated" if plan.n_padded else ""
    dist.print0(f"[train] {meta.n_cells} cells, {meta.n_genes} genes, {meta.n_regions} regions; "
                f"{info.world_size} process(es), backend {cfg.dist.backend}, device {info.device}; "
                f"{plan.n_cells} training cells per epoch (data.remainder={cfg.data.remainder}{left}), "
                f"{len(train_stream)} steps/epoch/rank; run dir {run_dir}")

    def save(mid_epoch: bool) -> None:
        state = {"epoch": epoch, "step": step, "batches_done": batches_done if mid_epoch else 0,
                 "config": config_to_json(cfg), "world_size": info.world_size,
                 "stopped": stopped, "stop_reason": stop_reason, "last_validation": last_val, **tracker.state_dict(),
                 "best_weights": ckpt.read_best(run_dir) if cfg.run.keep == "best" and info.is_main else {},
                 "guard": guard.state_dict(), "data_fingerprint": checks.data_fingerprint(meta), "cells_fingerprint": cells,
                 "torch_threads": torch.get_num_threads(), "code_fingerprint": code, "weights_dtype": str(weights_dtype)}
        stream = train_stream.state_dict(batches_consumed=batches_done) if mid_epoch else {}
        rank_state = {"rng": ckpt.rng_state(), "stream": stream, "epoch_totals": totals.state_dict() if mid_epoch else None}
        if ref is not None and info.is_main:
            query.keep_record(ref, run_dir)  # a resume then needs the checkpoint only, not the reference directory
        final = ckpt.save_checkpoint(run_dir, step, state, rank_state, w, keep=cfg.run.keep_checkpoints)
        guard.last_good_checkpoint = str(final)

    # ---- train
    clock = StepClock(time.perf_counter())  # cells/s over training steps only (trainer/metrics.py)
    w.train()
    # closed on every way out (an error too): the workers would otherwise outlive the run until garbage
    # collection, e.g. into the next member of an in-process Hydra multirun
    with contextlib.closing(EpochLoader(train_stream, cfg)) as epochs:
        while epoch < cfg.run.epochs and not stopped:
            if batches_done == 0:
                train_stream.set_epoch(epoch)
            kl_w = kl_schedule(epoch, step, o.n_epochs_kl_warmup, o.n_steps_kl_warmup, o.min_kl_weight, o.max_kl_weight)
            it = iter(epochs)
            slices = EpochSlices.of_stream(train_stream)  # every rank's batch sizes at every step of the epoch
            if cfg.data.num_workers > 0:  # the workers hold their copies of a resume position now
                train_stream.clear_resume()
            loader_start = True  # the epoch's first batch waits for the loader (workers, prefetch) to start
            while True:
                t0 = time.perf_counter()
                batch = next(it, None)
                t1 = time.perf_counter()
                if batch is None:
                    break
                batch = to_device(batch, info.device)
                if not cfg.optim.n_epochs_kl_warmup:  # step-based warm-up (null or 0, as kl_weight reads it)
                    kl_w = kl_schedule(epoch, step, None, o.n_steps_kl_warmup, o.min_kl_weight, o.max_kl_weight)
                sl = slices.at(batches_done, batch[keys.BATCH].shape[0])
                eps = step_noise(cfg.run.seed, step, sl.offset, sl.size, sl.total, module.n_noise, info.device)
                values = train_one_step(w, batch, kl_w, eps, guard, step, sl.share)
                step += 1
                batches_done += 1
                clock.add_step(sl.total, t1 - t0, time.perf_counter() - t1, loader_start)
                loader_start = False
                if values is not None:
                    totals.add(values, sl.size)
                last = batches_done == len(train_stream) or (cfg.run.max_steps is not None and step >= cfg.run.max_steps)
                if values is not None and (step % cfg.logger.log_every == 0 or last):  # the same on every rank
                    # the global batch's terms, not rank 0's minibatch, and the read counters of every rank, in one
                    # collective on logging steps only (a skip and the step number are the same on every rank, so
                    # every rank joins it)
                    values = dist.cell_weighted_means(values, batch[keys.BATCH].shape[0], TRAIN_TERMS,
                                                      counts=read_stats.as_dict())
                    metrics.log({"kind": "train", "step": step, "epoch": epoch, **values, "kl_weight": kl_w,
                                 "lr": w.lr, **clock.take(time.perf_counter()),
                                 "skipped_steps": guard.skipped_total, "classifier_skipped_steps": guard.classifier_skipped,
                                 **memory_mb()})
                if cfg.run.max_steps is not None and step >= cfg.run.max_steps:
                    stopped, stop_reason = True, "max_steps"
                    break
                if cfg.run.checkpoint_every_steps and step % cfg.run.checkpoint_every_steps == 0 \
                        and batches_done < len(train_stream):
                    save(mid_epoch=True)
            epoch_complete = batches_done >= len(train_stream)
            # one record per epoch, when it is complete (a max_steps stop inside it keeps the sums in its
            # checkpoint: the continued run logs the whole epoch once); collective, the same on every rank
            if epoch_complete and (epoch_record := totals.record()):
                metrics.log({"kind": "train_epoch", "step": step, "epoch": epoch, **epoch_record})
            # ---- validate (every n-th epoch and after the last), early stopping decided once and shared
            every = cfg.run.validate_every_epochs
            scheduled = bool(every) and epoch_complete and (epoch + 1 >= cfg.run.epochs or (epoch + 1) % every == 0)
            improved = False
            if scheduled or (every and stopped):
                last_val = validate(module, val_stream, info.device, kl_w, seed=cfg.run.seed)
            else:
                last_val = {}
            # a validation after a max_steps stop off the schedule (inside an epoch, or at the end of an epoch
            # that validate_every_epochs skips) is reported, not tracked: the uninterrupted run does not
            # validate there, so best / patience / keep=best must not see it (exact continuation)
            if last_val and scheduled:
                improved, early = tracker.update(last_val, epoch, step)
                if early:
                    stopped, stop_reason = True, "early"
                if tracker.plateau is not None:
                    w.set_lr(tracker.plateau.lr)
            if last_val:  # (tracked: false marks the reported-only one; a continued run's history keeps it)
                metrics.log({"kind": "validation", "step": step, "epoch": epoch, **last_val, "best": tracker.best,
                             "lr": w.lr, "tracked": scheduled})
            if improved and cfg.run.keep == "best":  # the same decision on every rank (validation is all-reduced)
                best_weights = w.full_weights()  # every rank: DeepSpeed gathers its fp32 master weights
                if info.is_main:
                    ckpt.write_best(run_dir, best_weights)
            if epoch_complete:
                epoch, batches_done = epoch + 1, 0
                totals.reset()
            # a max_steps stop inside an epoch keeps its stream position: raising max_steps resumes there
            save(mid_epoch=not epoch_complete)

    # ---- export (rank 0)
    model_dir = None
    reads = read_stats_all_ranks()  # collective: every rank joins it, rank 0 reports it
    weights = w.full_weights()  # every rank joins (DeepSpeed gathers); the weights on rank 0
    if info.is_main:
        about = {"weights": "last", "epochs": epoch, "steps": step, "validation": last_val,
                 # what inference needs of the training store: its cells (per-cell modality weights are rows
                 # of a table over them) and the ATAC size factors' denominator (trainer/export.py)
                 TRAINING_STORE: {"cells_fingerprint": cells,
                                  "atac_library_max": float(train_stream.table.atac_library_max)}}
        if cfg.run.keep == "best" and (run_dir / ckpt.BEST_FILE).is_file():
            # model.json describes the weights it ships: the best epoch's step and validation, not the last's
            # (not the last epoch's epochs/steps/validation where best_info is empty: a resume from a checkpoint
            # written before best_info was kept)
            weights = ckpt.read_best(run_dir)
            about = {"weights": "best", TRAINING_STORE: about[TRAINING_STORE], **tracker.best_info}
        model_dir = str(export_model(weights, model_meta, cfg, run_dir / "model", extra={**about, "best": tracker.best}))
        (run_dir / "result.json").write_text(json.dumps(
            {"epochs": epoch, "steps": step, "stopped": stopped, "stop_reason": stop_reason, "best": tracker.best,
             "validation": last_val,
             "skipped_steps": guard.skipped_total, "classifier_skipped_steps": guard.classifier_skipped,
             "model_dir": model_dir, "world_size": info.world_size, **reads}))
        dist.print0(f"[train] done: {epoch} epoch{'s' if epoch != 1 else ''}, {step} step{'s' if step != 1 else ''}; "
                    f"model in {model_dir}")
        warn_if_collapsed(last_val)
    metrics.close(plot=cfg.logger.plot)
    if read_stats.retries or read_stats.failures:  # transient store read errors this rank survived
        print(f"[train] rank {info.rank}: {read_stats.retries} store reads retried "
              f"({read_stats.injected} injected errors)", flush=True)
    # every rank reports: tests check that all ranks stop at the same epoch
    print(f"[train] rank {info.rank} finished at epoch {epoch} step {step}", flush=True)
    dist.barrier()
    return TrainResult(run_dir=str(run_dir), model_dir=model_dir, epochs=epoch, steps=step,
                       stopped_early=stop_reason == "early",
                       best=tracker.best, skipped_steps=guard.skipped_total, last_validation=last_val)
