"""A run stopped by run.max_steps and continued with a larger (or no) limit is the uninterrupted run:
the same validations count for best / patience / keep=best.

    .venv/bin/python -m pytest tests/test_loop_resume_exact.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import tiny_config, tiny_store
from trainer import checkpoint as ckpt
from trainer.train import train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("resume_exact") / "store", n_cells=400)


def test_a_max_steps_stop_at_an_epoch_end_off_the_validation_schedule_is_not_tracked(store, tmp_path):
    """run.validate_every_epochs=2: the uninterrupted run validates after epochs 1 and 3 only. A stop at
    run.max_steps exactly at the end of epoch 0 validates there (the last thing the run does), and that
    validation used to count as the first tracked one: it became `best`, the next two counted as bad
    epochs and the continued run stopped early with another best than the uninterrupted run."""
    opts = {"run.epochs": 4, "run.validate_every_epochs": 2, "run.patience": 2, "run.min_delta": 1e9,
            "run.keep": "best"}
    full = train(tiny_config(store, tmp_path / "full", **opts))
    assert full.epochs == 4 and not full.stopped_early
    per_epoch = full.steps // 4
    part = tmp_path / "part"
    first = train(tiny_config(store, part, **{**opts, "run.max_steps": per_epoch}))
    assert first.steps == per_epoch and first.epochs == 1 and first.last_validation  # reported
    done = train(tiny_config(store, part, **opts))
    assert (done.steps, done.epochs, done.stopped_early, done.best) == (full.steps, 4, False, full.best)
    a = load_file(str(Path(full.model_dir) / "model.safetensors"))
    b = load_file(str(Path(done.model_dir) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_past_run_max_steps_trains_no_further_step(store, tmp_path):
    """A run killed after its step-4 checkpoint and rerun with run.max_steps=4 (or less) has nothing left
    to train: it used to take one more step before checking the limit, ending at step 5 with a new
    checkpoint beyond the limit."""
    opts = {"run.epochs": 2, "run.checkpoint_every_steps": 2, "run.keep_checkpoints": 0}
    full = tmp_path / "full"
    whole = train(tiny_config(store, full, **opts))
    assert whole.steps == 12  # 6 steps per epoch (5 full batches, 1 short: data.remainder=even)
    src = ckpt.checkpoints_root(full) / "step_000000004"  # inside epoch 0
    for limit in (4, 3):
        run = tmp_path / f"limit{limit}"
        shutil.copytree(src, ckpt.checkpoints_root(run) / src.name)  # the killed run's newest checkpoint
        res = train(tiny_config(store, run, **{**opts, "run.max_steps": limit}))
        assert res.steps == 4 and res.epochs == 0, (limit, res)
        assert [c.name for c in ckpt.complete_checkpoints(run)] == [src.name]
        result = json.loads((run / "result.json").read_text())
        assert (result["steps"], result["stopped"], result["stop_reason"]) == (4, True, "max_steps")
    # the limit raised again: the run continues from that checkpoint to the end
    res = train(tiny_config(store, run, **opts))
    assert res.steps == 12 and res.epochs == 2


def test_resuming_with_fewer_epochs_than_the_checkpoint_says_it_trains_nothing(store, tmp_path, capsys):
    """run.epochs below the checkpoint's epoch exported the run as it stood without a word."""
    run = tmp_path / "run"
    done = train(tiny_config(store, run, **{"run.epochs": 2}))
    capsys.readouterr()
    again = train(tiny_config(store, run, **{"run.epochs": 1}))
    assert (again.steps, again.epochs) == (done.steps, 2)
    assert "nothing left to train: the checkpoint is at epoch 2, run.epochs=1; exporting it" in capsys.readouterr().out
