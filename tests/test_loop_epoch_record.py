"""The train_epoch record (trainer/epoch_totals.py) and the train record of every epoch's last step.

    .venv/bin/python -m pytest tests/test_loop_epoch_record.py -q
"""

from __future__ import annotations

import json

import pytest

from data.plan import step_sizes
from data.stream import StoreStream
from tests.train_utils import tiny_config, tiny_overrides, tiny_store, train_cli
from trainer.loop import run

TERMS = ("recon_rna", "recon_atac", "kl", "penalty")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store", n_cells=360)


def _n_train(store) -> int:
    return StoreStream(str(store), 64).plan().n_cells  # the trainer's split (val_fraction 0.1)


def _records(run_dir, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_every_epoch_logs_its_last_step_and_its_mean_over_all_training_cells(store, tmp_path):
    """A run whose step count was not a multiple of logger.log_every had no record of its last steps, and
    nothing reported the epoch's training ELBO (what the reference's history["elbo_train"] holds) to put
    next to elbo_validation."""
    n = _n_train(store)
    steps = len(step_sizes(n, batch_size=64, world_size=1, remainder="even"))
    assert steps == 6  # 335 cells: 5 x 64 and a last batch of 15
    out = tmp_path / "run"
    run(tiny_config(store, out, **{"logger.log_every": 4, "run.epochs": 2}))
    assert [r["step"] for r in _records(out, "train")] == [4, 6, 8, 12]  # 6 and 12 end the epochs
    epochs = _records(out, "train_epoch")
    assert [(r["epoch"], r["step"], r["n_train"], r["steps_train"]) for r in epochs] == [(0, 6, n, 6), (1, 12, n, 6)]
    for r in epochs:
        assert r["reconstruction_loss_train"] > 0 and r["kl_train"] > 0
        # elbo = reconstruction + KL + the modality penalty (a divergence, >= 0)
        assert r["elbo_train"] >= r["reconstruction_loss_train"] + r["kl_train"] - 1e-9
    validation = _records(out, "validation")[-1]  # the same quantity on held-out cells: the same scale
    assert 0.5 < epochs[-1]["elbo_train"] / validation["elbo_validation"] < 2


def test_a_resumed_epoch_reports_what_the_uninterrupted_one_does(store, tmp_path):
    """The epoch's sums travel in the mid-epoch checkpoint: stopped at step 2 (run.max_steps) and continued,
    the epoch's record equals the uninterrupted run's bit for bit (not a mean of the last 4 steps)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(tiny_config(store, whole, **{"run.epochs": 1}))
    run(tiny_config(store, split, **{"run.epochs": 1, "run.max_steps": 2}))
    assert _records(split, "train_epoch") == []  # one record per epoch, when complete (not a partial one too)
    run(tiny_config(store, split, **{"run.epochs": 1, "run.max_steps": None}))
    expected, got = _records(whole, "train_epoch"), _records(split, "train_epoch")
    assert len(expected) == 1 and got == expected
    assert got[-1]["steps_train"] == 6


@pytest.mark.slow
def test_ddp_epoch_record_is_exact_over_ranks_and_uneven_last_batches(store, tmp_path):
    """2 ranks at 64 cells: the epoch's 335 cells are 2 x 128 and a last step of 39 + 40. The epoch means are
    the cell-weighted means of the steps' (global) train records, and every cell is counted once."""
    n = _n_train(store)
    sizes = step_sizes(n, batch_size=64, world_size=2, remainder="even")
    assert sizes.tolist() == [[64, 64], [64, 64], [39, 40]]
    out = tmp_path / "run"
    train_cli(tiny_overrides(store, out, **{"logger.log_every": 1, "run.epochs": 1}), nproc=2)
    steps = _records(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3]
    (epoch,) = _records(out, "train_epoch")
    totals = sizes.sum(axis=1)
    assert epoch["n_train"] == n == totals.sum() and epoch["steps_train"] == 3
    elbo = sum(t * sum(r[k] for k in TERMS) for t, r in zip(totals, steps, strict=True)) / n
    loss = sum(t * r["loss"] for t, r in zip(totals, steps, strict=True)) / n
    assert epoch["elbo_train"] == pytest.approx(elbo, rel=1e-9)
    assert epoch["loss_train"] == pytest.approx(loss, rel=1e-9)
