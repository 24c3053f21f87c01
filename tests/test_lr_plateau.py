"""optim.reduce_lr_on_plateau: the reference's learning-rate plateau rule (scvi-tools plan_kwargs), the same
arithmetic as torch's ReduceLROnPlateau, applied by the training loop, carried by the checkpoint, and
reaching DeepSpeed's update.

    .venv/bin/python -m pytest tests/test_lr_plateau.py -q
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import PRECISIONS, ROOT, tiny_config, tiny_store, torchrun
from trainer.config import ConfigError
from trainer.loop import run
from trainer.schedules import LrPlateau


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store", n_cells=600)


def _torch_rates(values, lr, factor, patience, threshold, min_lr):
    """What the reference's scheduler does: torch's class, configured as scvi-tools configures it."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sch = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=patience, factor=factor, threshold=threshold,
                                                     min_lr=min_lr, threshold_mode="abs")
    rates = []
    for v in values:
        sch.step(v)
        rates.append(opt.param_groups[0]["lr"])
    return rates


def test_same_rates_as_torchs_reduce_lr_on_plateau():
    rng = random.Random(0)
    for trial in range(300):
        lr = rng.choice([1e-3, 1e-4, 5e-8])
        kw = {"factor": rng.choice([0.6, 0.1, 0.5]), "patience": rng.choice([0, 1, 2, 5]),
              "threshold": rng.choice([0.0, 0.5, 3.0]), "min_lr": rng.choice([0.0, lr / 10, 1e-9])}
        # noisy plateaus, exact ties, a NaN now and then
        values = [round(100 - i * rng.choice([0, 0.1, 1, 5]) + rng.gauss(0, 1), rng.choice([0, 1, 3]))
                  for i in range(40)]
        values = [math.nan if rng.random() < 0.05 else v for v in values]
        plateau = LrPlateau(lr, **kw)
        ours = []
        for v in values:
            plateau.step(v)
            ours.append(plateau.lr)
        assert ours == _torch_rates(values, lr, **kw), (trial, kw, values)


def test_step_reports_a_lowering_and_the_state_round_trips():
    p = LrPlateau(1.0, factor=0.5, patience=1)
    assert [p.step(v) for v in (3.0, 3.0, 3.0, 2.0, 2.5, 2.5)] == [False, False, True, False, False, True]
    assert p.lr == 0.25
    q = LrPlateau(1.0, factor=0.5, patience=1)
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert (q.lr, q.best, q.bad) == (p.lr, p.best, p.bad)
    fresh = LrPlateau(1.0).state_dict()
    assert fresh["best"] == math.inf  # (torch.save keeps inf; the loop stores it in trainer.pt)


@pytest.mark.parametrize(("extra", "named"), [
    ({"optim.lr_factor": 1.0}, "optim.lr_factor"),
    ({"optim.lr_factor": 0.0}, "optim.lr_factor"),
    ({"optim.lr_factor": math.nan}, "optim.lr_factor"),
    ({"optim.lr_patience": -1}, "optim.lr_patience"),
    ({"optim.lr_threshold": -0.1}, "optim.lr_threshold"),
    ({"optim.lr_min": math.inf}, "optim.lr_min"),
    ({"optim.lr_scheduler_metric": "kl_local_validation"}, "optim.lr_scheduler_metric"),
    ({"optim.reduce_lr_on_plateau": True, "optim.lr_min": 1e-3}, "optim.lr_min"),  # = optim.lr: no effect
    ({"optim.reduce_lr_on_plateau": True, "run.validate_every_epochs": 0, "run.early_stopping": False},
     "run.validate_every_epochs=0"),
    ({"optim.reduce_lr_on_plateau": True, "data.val_fraction": 0.0, "run.early_stopping": False},
     "optim.reduce_lr_on_plateau=false"),
])
def test_bad_settings_are_refused_with_the_key_named(store, tmp_path, extra, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        tiny_config(store, tmp_path / "run", **extra)


# a threshold far above any change makes every validation after the first "no improvement": with patience
# 1 the rate halves after epochs 2 and 4, whatever the data
PLATEAU = {"optim.reduce_lr_on_plateau": True, "optim.lr_factor": 0.5, "optim.lr_patience": 1,
           "optim.lr_threshold": 1e9, "run.early_stopping": False}


def _records(run_dir, kind):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_the_loop_lowers_the_rate_and_a_resumed_run_counts_on(store, tmp_path):
    full = tmp_path / "full"
    run(tiny_config(store, full, **PLATEAU, **{"run.epochs": 5}))
    val = _records(full, "validation")
    assert [r["lr"] for r in val] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]
    # the train records (the optimizer's own rate) follow: epoch 3 trains at the halved rate
    assert {r["lr"] for r in _records(full, "train") if r["epoch"] == 3} == {5e-4}

    # stop after epoch 3 (one validation without improvement counted), resume to 5: the count is restored,
    # so the rate halves after epoch 4 again and the weights are the uninterrupted run's
    part = tmp_path / "part"
    run(tiny_config(store, part, **PLATEAU, **{"run.epochs": 4}))
    run(tiny_config(store, part, **PLATEAU, **{"run.epochs": 5}))
    assert [r["lr"] for r in _records(part, "validation")][-1] == 2.5e-4
    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(part / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # the same run without the rule trains otherwise (the lowered rate was used)
    plain = tmp_path / "plain"
    run(tiny_config(store, plain, **{"run.epochs": 5, "run.early_stopping": False}))
    c = load_file(str(plain / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert {r["lr"] for r in _records(plain, "validation")} == {1e-3}


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_set_lr_reaches_deepspeeds_update_under_every_zero_stage(store, tmp_path, precision):
    """DeepSpeed wraps the client AdamW (ZeRO 1/2 move its parameters to flat fp32 partitions; bf16 ZeRO 0 its
    FP16_UnfusedOptimizer): a rate written where the wrapper shows it must be the rate its step uses. lr 0
    leaves every weight as it was."""
    torchrun([str(ROOT / "tests" / "workers" / "ds_set_lr.py"), str(store), str(tmp_path / "out"), precision],
             nproc=2)
    for r in (0, 1):
        res = json.loads((tmp_path / f"out.rank{r}.json").read_text())
        for stage in ("0", "1", "2"):
            s = res[stage]
            assert s["reported_lr"] == 0.0 and s["changed_at_lr_0"] == 0.0, (r, stage, s)
            assert s["changed_at_lr_1e-2"] > 0.0, (r, stage, s)
