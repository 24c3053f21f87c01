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


def _drawn_lines(monkeypatch, rows, tmp_path):
    """plot_losses over ``rows``; returns the saved figure's lines as (label, n points, marker)."""
    import json

    from matplotlib.figure import Figure

    from trainer.metrics import plot_losses

    saved = []
    real_savefig = Figure.savefig

    def spy(fig, *args, **kwargs):
        saved.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png") == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").stat().st_size > 0
    return [(ln.get_label(), len(ln.get_xdata()), ln.get_marker()) for ln in saved[0].axes[0].get_lines()]


def test_loss_png_shows_a_train_loss_of_one_record(monkeypatch, tmp_path):
    """A run with one train record (run.max_steps=1, or fewer steps than 2 x logger.log_every) drew its loss
    as a line of one point without a marker: loss.png showed the legend entry and nothing else."""
    rows = [{"kind": "train", "step": 1, "epoch": 0, "loss": 4200.0},
            {"kind": "validation", "step": 1, "epoch": 0, "reconstruction_loss_validation": 5000.0,
             "elbo_validation": 5010.0}]
    lines = _drawn_lines(monkeypatch, rows, tmp_path)
    assert {label for label, _, _ in lines} == {"loss", "reconstruction_loss_validation", "elbo_validation"}
    invisible = [label for label, n, marker in lines if n < 2 and marker in (None, "None", "", " ")]
    assert not invisible, f"series drawn without any visible mark: {invisible}"


def test_loss_png_draws_the_epochs_training_elbo_next_to_validations(monkeypatch, tmp_path):
    """elbo_train (train_epoch records) and elbo_validation are the same quantity: drawn together, with markers
    as validation's, a gap opening between them shows over-fitting."""
    rows = []
    for epoch in range(3):
        rows += [{"kind": "train", "step": 10 * epoch + 5, "epoch": epoch, "loss": 100.0 - epoch},
                 {"kind": "train_epoch", "step": 10 * epoch + 10, "epoch": epoch, "elbo_train": 95.0 - 2 * epoch},
                 {"kind": "validation", "step": 10 * epoch + 10, "epoch": epoch, "elbo_validation": 96.0 - epoch}]
    lines = {label: (n, marker) for label, n, marker in _drawn_lines(monkeypatch, rows, tmp_path)}
    assert lines["elbo_train"] == (3, "o") and lines["elbo_validation"] == (3, "o") and lines["loss"][0] == 3


def test_loss_png_marks_where_the_plateau_rule_lowered_the_rate(monkeypatch, tmp_path):
    rows = []
    for epoch, lr in enumerate((1e-3, 1e-3, 6e-4, 6e-4, 3.6e-4)):
        rows += [{"kind": "train", "step": 10 * epoch + 5, "epoch": epoch, "loss": 100.0 - epoch, "lr": lr},
                 {"kind": "validation", "step": 10 * epoch + 10, "epoch": epoch, "elbo_validation": 90.0,
                  "reconstruction_loss_validation": 80.0, "lr": lr}]
    lines = _drawn_lines(monkeypatch, rows, tmp_path)
    series = {"loss", "reconstruction_loss_validation", "elbo_validation"}
    marks = [label for label, _, _ in lines if label not in series]
    # two vertical lines (after epochs 1 and 3), one legend entry
    assert len(marks) == 2 and marks[0] == "learning rate lowered" and marks[1].startswith("_"), lines


def test_a_full_disk_while_writing_metrics_names_the_file_and_the_way_back(tmp_path):
    """mva-train: error: [Errno 28] No space left on device -- which file, and what now? (helper audit)"""
    import errno

    from trainer.metrics import MetricsWriter

    class Full:
        def write(self, _):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    writer = MetricsWriter(tmp_path / "run", enabled=True)
    writer._fh.close()
    writer._fh = Full()
    with pytest.raises(OSError, match=r"No space left on device: writing .*run/metrics.jsonl .*resume=auto") as exc:
        writer.log({"kind": "train", "step": 1, "loss": 1.0})
    assert exc.value.errno == errno.ENOSPC
