"""What a train record's rate and memory fields mean.

    .venv/bin/python -m pytest tests/test_loop_metrics.py -q
"""

from __future__ import annotations

import pytest

from trainer.metrics import StepClock


def test_cells_per_s_counts_training_steps_only():
    """The first record of every epoch divided its cells by a window that also held the previous epoch's
    validation, checkpoint write and the loader's start-up (a 2,400-cell run: 1,285 instead of 4,133 cells/s).
    The rate is now over the steps' own time; the rest is reported as non_step_s."""
    clock = StepClock(now=100.0)
    # epoch start: the first batch waits 3 s for spawned workers, then 0.05 s of compute
    clock.add_step(64, wait_s=3.0, compute_s=0.05, loader_start=True)
    clock.add_step(64, wait_s=0.01, compute_s=0.05)
    clock.add_step(64, wait_s=0.01, compute_s=0.05)
    # ... then 10 s of validation and a checkpoint write before the record at t = 113.17
    rec = clock.take(now=113.17)
    step_s = 0.05 * 3 + 0.01 * 2
    assert rec["cells_per_s"] == pytest.approx(192 / step_s)
    assert rec["data_wait_s"] == pytest.approx(0.02)
    assert rec["non_step_s"] == pytest.approx(13.17 - step_s)
    # a new window starts at the record: two plain steps, nothing between them
    clock.add_step(128, wait_s=0.0, compute_s=0.1)
    clock.add_step(128, wait_s=0.02, compute_s=0.08)
    rec = clock.take(now=113.37)
    assert rec["cells_per_s"] == pytest.approx(256 / 0.2)
    assert rec["data_wait_s"] == pytest.approx(0.02) and rec["non_step_s"] == pytest.approx(0.0, abs=1e-9)


def test_memory_fields_are_current_rss_and_no_accelerator_field_without_one():
    """The CPU side of memory_mb (the accelerator side, a per-record peak that is reset after each read,
    needs a GPU): mem_rss_mb is the resident memory now, not a peak, and there is no mem_gpu_mb key where
    torch has no accelerator."""
    import numpy as np
    import psutil
    import torch

    from trainer.metrics import memory_mb

    big = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    during = memory_mb()
    now = psutil.Process().memory_info().rss / 2**20
    assert abs(during["mem_rss_mb"] - now) < 16 and big.sum() > 0
    if not torch.accelerator.is_available():
        assert "mem_gpu_mb" not in during
