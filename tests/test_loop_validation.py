"""Validation and early stopping on a store whose held-out cells make the validation non-finite.

    .venv/bin/python -m pytest tests/test_loop_validation.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from data.split import cell_hash, is_validation
from data.store_format import StoreSchema
from data.synthetic import SynthConfig, _block, _Params
from data.writer import StoreWriter
from tests.train_utils import tiny_config
from trainer.metrics import read_metrics
from trainer.train import train


def _store_with_a_huge_covariate_in_validation(out: Path) -> Path:
    """A synthetic store whose validation cells carry pct_mito = 3e38: finite (every store check accepts
    it), but the decoder's first layer overflows, so every validation is NaN while training is not."""
    c = SynthConfig(out=str(out), n_cells=400, n_genes=100, n_regions=300, seed=0, with_covariates=True)
    schema = StoreSchema(
        gene_names=[f"gene_{i:05d}" for i in range(c.n_genes)],
        region_names=[f"chr1:{1000 * i + 1}-{1000 * i + 501}" for i in range(c.n_regions)],
        batch_key="batch", batch_categories=[f"batch_{i}" for i in range(c.n_batches)],
        cat_cov_keys=["site"], cat_cov_categories={"site": ["site_a", "site_b"]}, cont_cov_keys=["pct_mito"],
        label_key="cell_type", label_categories=[f"type_{i}" for i in range(c.n_cell_types)])
    with StoreWriter(out, schema, source={"kind": "test"}, preshuffled=True) as w:
        rna, atac, obs = _block(c, _Params(c), 0, 0, c.n_cells)
        obs.loc[is_validation(cell_hash(obs.index), 0.1), "pct_mito"] = np.float32(3e38)
        w.append(rna, atac, obs)
    return out


@pytest.fixture(scope="module")
def nan_val_store(tmp_path_factory):
    return _store_with_a_huge_covariate_in_validation(tmp_path_factory.mktemp("store") / "store")


def test_early_stopping_when_no_validation_was_ever_finite_stops_cleanly(nan_val_store, tmp_path):
    """patience validations that are all NaN: early stopping fires with best=None, and its message crashed
    the run with a TypeError (formatting None with .4f) instead of stopping it."""
    res = train(tiny_config(nan_val_store, tmp_path / "run", **{"run.epochs": 4, "run.patience": 2}))
    assert res.stopped_early and res.epochs == 2 and res.best is None and res.skipped_steps == 0
    vals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "validation"]
    assert len(vals) == 2 and all(math.isnan(r["reconstruction_loss_validation"]) for r in vals)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_keep_best_model_json_describes_the_weights_it_ships(tmp_path, monkeypatch):
    """keep=best exports the best epoch's weights, but model.json recorded the LAST epoch's steps and
    validation next to them: a reader took the last validation for the shipped model's."""
    import json

    from tests.train_utils import tiny_store, validations_get_worse

    store = tiny_store(tmp_path / "store", n_cells=400)
    validations_get_worse(monkeypatch)  # the first validation stays the lowest: the best weights are epoch 0's
    opts = {"run.epochs": 3, "run.keep": "best", "run.early_stopping": False, "run.keep_checkpoints": 0}
    res = train(tiny_config(store, tmp_path / "run", **opts))
    vals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "validation"]
    assert len(vals) == 3 and vals[0]["reconstruction_loss_validation"] != vals[-1]["reconstruction_loss_validation"]
    info = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert info["weights"] == "best" and info["epochs"] == 1 and info["steps"] == vals[0]["step"]
    assert info["validation"]["reconstruction_loss_validation"] == vals[0]["reconstruction_loss_validation"]
    assert info["best"] == res.best == vals[0]["reconstruction_loss_validation"]
    # the run's own record still says where it ended
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == vals[-1]["step"] and result["validation"] == res.last_validation

    # resumed from the end of epoch 1 (best = epoch 0) in another directory: the description travels too
    first = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[1]
    train(tiny_config(store, tmp_path / "other", **{**opts, "run.resume": str(first)}))
    again = json.loads((tmp_path / "other" / "model" / "model.json").read_text())
    assert {k: again[k] for k in ("weights", "epochs", "steps", "validation")} == \
        {k: info[k] for k in ("weights", "epochs", "steps", "validation")}


def test_keep_best_from_a_checkpoint_without_best_info_claims_no_last_epoch(tmp_path, monkeypatch):
    """A checkpoint written before ``best_info`` was kept (older trainer.pt) restores the best weights but not
    where they came from. model.json then shipped the best weights labelled with the LAST epoch's epochs,
    steps and validation; it must say "best" and leave out what it does not know."""
    import json

    import torch

    from tests.train_utils import tiny_store, validations_get_worse
    from trainer.checkpoint import save_file
    from trainer.checkpoint_checks import safe_load

    store = tiny_store(tmp_path / "store", n_cells=400)
    validations_get_worse(monkeypatch)  # best: epoch 0
    opts = {"run.epochs": 3, "run.keep": "best", "run.early_stopping": False, "run.keep_checkpoints": 0}
    train(tiny_config(store, tmp_path / "run", **{**opts, "run.epochs": 2}))
    first = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[1]  # end of epoch 1 (best: epoch 0)
    state = safe_load(first / "trainer.pt")
    assert state.pop("best_info")["epochs"] == 1  # the record an older checkpoint lacks
    save_file(state, first / "trainer.pt")

    res = train(tiny_config(store, tmp_path / "other", **{**opts, "run.resume": str(first)}))
    info = json.loads((tmp_path / "other" / "model" / "model.json").read_text())
    assert info["weights"] == "best" and info["best"] == res.best
    assert not {"epochs", "steps", "validation"} & info.keys(), info  # not the last epoch's (3, its step, ...)
    assert "training_store" in info
    shipped = torch.load(first / "trainer.pt", weights_only=True)  # untouched by the run (still without it)
    assert "best_info" not in shipped


def test_keep_best_ships_the_lowest_validation_while_min_delta_only_paces_early_stopping(tmp_path, capsys):
    """run.min_delta is early stopping's threshold (Lightning's EarlyStopping); keep=best shipped the weights
    of the last validation that beat the best by more than min_delta, not the lowest one (Lightning's
    ModelCheckpoint): a run improving in steps under min_delta shipped epoch 0's weights."""
    import json

    import torch
    from safetensors.torch import load_file

    from tests.train_utils import tiny_store
    from trainer.checkpoint_checks import safe_load

    store = tiny_store(tmp_path / "store", n_cells=400)
    opts = {"run.epochs": 4, "run.keep": "best", "run.min_delta": 1e9, "run.patience": 1}
    res = train(tiny_config(store, tmp_path / "run", **opts))
    vals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "validation"]
    losses = [r["reconstruction_loss_validation"] for r in vals]
    # patience counts improvements by more than min_delta: none after epoch 0, so it stops after epoch 1
    assert res.stopped_early and res.epochs == 2 and len(vals) == 2
    # patience counts validations (it said "epochs": wrong with validate_every_epochs > 1)
    assert "improvement > 1000000000.0 for 1 validation (best" in capsys.readouterr().out
    assert losses[1] < losses[0], losses  # ... while the validation did improve
    info = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert info["weights"] == "best" and info["epochs"] == 2 and info["steps"] == vals[1]["step"]
    assert res.best == info["best"] == losses[1] and vals[1]["best"] == losses[1]
    # the run ended at its lowest validation: the shipped weights are the last trained ones
    shipped = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    trained = safe_load(max((tmp_path / "run" / "checkpoints").glob("step_*")) / "model.pt")["model"]
    assert all(torch.equal(v, trained[k].to(v.dtype)) for k, v in shipped.items())
