"""KL warm-up schedule: epoch-based default (spec §3.6 values), step-based option, edge cases.

Run: ``.venv/bin/python -m pytest tests/test_schedules.py -q``
"""

from __future__ import annotations

import pytest

from trainer.schedules import kl_weight


def test_epoch_warmup_matches_the_reference_values():
    assert [kl_weight(e) for e in (0, 1, 25, 49, 50, 400)] == [0.0, 0.02, 0.5, 0.98, 1.0, 1.0]
    assert kl_weight(3, step=10_000) == kl_weight(3, step=0)  # constant within an epoch


def test_step_warmup_only_without_epoch_warmup():
    assert kl_weight(0, step=50, n_epochs_kl_warmup=None, n_steps_kl_warmup=200) == 0.25
    assert kl_weight(0, step=200, n_epochs_kl_warmup=None, n_steps_kl_warmup=200) == 1.0
    assert kl_weight(0, step=50, n_epochs_kl_warmup=10, n_steps_kl_warmup=200) == 0.0  # epochs win
    assert kl_weight(0, step=0, n_epochs_kl_warmup=None, n_steps_kl_warmup=None) == 1.0


def test_min_max_and_bad_input():
    assert kl_weight(5, n_epochs_kl_warmup=10, min_kl_weight=0.2, max_kl_weight=0.6) == pytest.approx(0.4)
    with pytest.raises(ValueError, match=">= 0"):
        kl_weight(-1)
    with pytest.raises(ValueError, match="min_kl_weight"):
        kl_weight(1, min_kl_weight=2.0)


def test_agrees_with_the_reference_function():
    from scvi.train._trainingplans import _compute_kl_weight

    for epoch, step, ne, ns in [
        (0, 0, 50, None),
        (7, 3, 50, None),
        (0, 30, None, 100),
        (2, 500, None, 100),
        (9, 9, None, None),
    ]:
        assert kl_weight(epoch, step, ne, ns) == pytest.approx(_compute_kl_weight(epoch, step, ne, ns))
        for lo, hi in ((0.2, 0.6), (0.0, 0.5), (0.3, 0.3)):  # plan_kwargs min_kl_weight / max_kl_weight
            assert kl_weight(epoch, step, ne, ns, min_kl_weight=lo, max_kl_weight=hi) == \
                pytest.approx(_compute_kl_weight(epoch, step, ne, ns, max_kl_weight=hi, min_kl_weight=lo))


def test_the_loop_warms_up_between_the_configured_weights(tmp_path):
    """optim.min_kl_weight / max_kl_weight reach the training step: the weight each train record reports."""
    import json

    from tests.train_utils import tiny_config, tiny_store
    from trainer.loop import run

    store = tiny_store(tmp_path / "store", n_cells=300)
    run(tiny_config(store, tmp_path / "run", **{"run.epochs": 3, "optim.n_epochs_kl_warmup": 2,
                                                   "optim.min_kl_weight": 0.1, "optim.max_kl_weight": 0.5,
                                                   "logger.log_every": 1, "run.early_stopping": False}))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_epoch = {}
    for r in rows:
        if r["kind"] == "train":
            by_epoch.setdefault(r["epoch"], set()).add(r["kl_weight"])
    assert sorted(by_epoch) == [0, 1, 2] and all(len(v) == 1 for v in by_epoch.values()), by_epoch
    assert [by_epoch[e].pop() for e in (0, 1, 2)] == pytest.approx([0.1, 0.3, 0.5])
