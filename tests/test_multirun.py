"""Hydra --multirun: each sweep member is a complete run in its own directory.

    .venv/bin/python -m pytest tests/test_multirun.py -q
"""

from __future__ import annotations

import json

import pytest

from tests.train_utils import tiny_overrides, tiny_store, train_cli


@pytest.mark.slow
def test_two_member_multirun(tmp_path):
    store = tiny_store(tmp_path / "store", n_cells=600)
    ov = tiny_overrides(store, tmp_path / "sweep", **{"run.epochs": 1})
    ov["model"].pop("n_latent")
    train_cli({**ov, "model": {**ov["model"], "n_latent": "4,7"}}, "--multirun")
    for member, n_latent in (("0", 4), ("1", 7)):
        run = tmp_path / "sweep" / member
        assert json.loads((run / "result.json").read_text())["epochs"] == 1
        info = json.loads((run / "model" / "model.json").read_text())
        assert info["model_args"]["n_latent"] == n_latent
        assert (run / "metrics.jsonl").is_file() and list((run / "checkpoints").glob("step_*"))


def test_sweep_preset_declares_the_grid():
    from hydra import compose, initialize_config_dir

    from tests.train_utils import ROOT

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="train", overrides=["+experiment=demo", "+sweep=latent_lr"],
                      return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert set(cfg.hydra.sweeper.params) == {"model.n_latent", "optim.lr"}
