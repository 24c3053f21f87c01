"""de/da pieces that need no trained BMMC model: the statistics against known answers, the config and
group-order rules, and a size-factor model end to end (tests/test_infer_de.py compares whole tables with
the reference).

    .venv/bin/python -m pytest tests/test_differential_units.py -q
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data.synthetic import write_synthetic_store
from tests.train_utils import tiny_config
from trainer import differential as D
from trainer.infer import infer
from trainer.infer_config import DiffOptions, InferConfig
from trainer.train import train


def test_size_factor_model(tmp_path):
    """A model trained with use_size_factor reads the batch's size factors in module.inference: the
    de/da loader must provide them (without, the job fails with a KeyError on the size factors)."""
    store = write_synthetic_store(tmp_path / "store", n_cells=400, n_genes=60, n_regions=120, progress=False)
    res = train(tiny_config(store, tmp_path / "run", **{"model.use_size_factor": True, "run.epochs": 1}))
    for job, col in (("de", "proba_de"), ("da", "prob_da")):
        out = tmp_path / f"{job}.csv"
        infer(InferConfig(model_dir=str(res.run_dir), store=str(store), output=str(out), job=job, progress=False,
                          batch_size=128, de=DiffOptions(groupby="cell_type", group1=["type_0"],
                                                         n_samples_overall=200)))
        df = pd.read_csv(out, index_col=0)
        assert len(df) == (60 if job == "de" else 120) and df[col].between(0, 1).all(), job
        assert np.isfinite(df["bayes_factor"]).all(), job

def test_statistics_known_answer():
    rng = np.random.default_rng(0)
    s2 = rng.uniform(0.01, 0.02, size=(400, 3))
    s1 = s2 * np.array([4.0, 1.0, 0.5])  # lfc exactly 2, 0, -1 in every sample
    ch = D.change_stats(s1, s2, delta=0.5, pseudocounts=0.0)
    np.testing.assert_allclose(ch["lfc_mean"], [2.0, 0.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(ch["lfc_std"], 0.0, atol=1e-12)
    np.testing.assert_array_equal(ch["proba_de"], [1.0, 0.0, 1.0])
    assert ch["bayes_factor"][0] > 15 and ch["bayes_factor"][1] < -15
    van = D.vanilla_stats(s1, s2)
    np.testing.assert_array_equal(van["proba_m1"], [1.0, 0.0, 0.0])  # equal samples are not "greater"
    # FDR: running mean of (1 - p) over p sorted descending: 0.01, 0.015, 0.177 -> the top 2 only
    np.testing.assert_array_equal(D.fdr_flags(np.array([0.5, 0.99, 0.1, 0.98]), 0.05), [False, True, False, True])
    assert not D.fdr_flags(np.array([0.9, 0.8]), 0.05).any() and D.fdr_flags(np.array([0.9, 0.8]), 0.2).all()
    # automatic delta: modes at -3, 0, +3 -> 0.6 * 3; flat LFCs -> the floor 0.1
    lfcs = np.concatenate([rng.normal(m, 0.05, 200) for m in (-3.0, 0.0, 3.0)])
    assert D.estimate_delta(lfcs) == pytest.approx(1.8, abs=0.02)
    assert D.estimate_delta(rng.normal(0, 1e-3, 300)) == 0.1
    # sampling: a pure function of (cells, n, seed, key)
    cells = np.arange(10, 20)
    a = D.sample_cells(cells, 50, 3, "x")
    assert np.array_equal(a, D.sample_cells(cells, 50, 3, "x")) and not np.array_equal(a, D.sample_cells(cells, 50, 3, "y"))
    assert set(a) <= set(cells) and D.samples_per_batch(5000, 3) == 1666 and D.samples_per_batch(1, 2) == 2
    with pytest.raises(ValueError, match="empty"):
        D.sample_cells(np.array([], dtype=np.int64), 5, 0, "x")

def test_a_negative_seed_is_a_config_error():
    """de/da seed numpy's SeedSequence, which refuses negative numbers: seed=-1 was a ValueError traceback
    after the raw pass; now refused with the other config values."""
    from data.typed_config import ConfigError
    from trainer.infer_config import load_infer_config

    with pytest.raises(ConfigError, match="seed must be >= 0, got -1"):
        load_infer_config({"job": "da", "model_dir": "m", "store": "s", "output": "x.csv", "seed": -1,
                           "de": {"groupby": "batch"}})

def test_numeric_groups_are_compared_in_numeric_order():
    """one-vs-rest over an integer column: the reference orders its groups 2 before 10 (text order put 10 first)."""
    from trainer.jobs.de_groups import cell_sets

    obs = pd.DataFrame({"cluster": [10, 2, 1, 2, 10, 1]}, index=[f"c{i}" for i in range(6)])
    cfg = InferConfig(model_dir="/x", store="/x", output="/x.csv", job="de", de=DiffOptions(groupby="cluster"))
    _, comps, _ = cell_sets(cfg, obs)
    assert [c.group1 for c in comps] == ["1", "2", "10"]
