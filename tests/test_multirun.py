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


@pytest.mark.slow
def test_two_member_multirun_on_two_ranks_through_train_sh(tmp_path):
    """Hydra runs the members one after another in the same torchrun processes: the second member's
    process group used to hang on the first one's keys in the launcher's store (until dist.timeout_s).
    Run from another directory with relative paths: train.sh no longer changes directory. --multirun last, as
    conf/sweep's comment writes it: train.sh appended run.output_dir after it, which Hydra's parser refused."""
    import os
    import subprocess

    from tests.train_utils import ROOT, env

    store = tiny_store(tmp_path / "store", n_cells=400)
    # one step per member and rank (batch 128): the case that hung; paths relative to tmp_path
    args = ["data.store=store", "model.n_latent=4,7", "model.n_hidden=16", "run.epochs=1", "logger.plot=false",
            "dist.timeout_s=60", "run.output_dir=sweep", "--multirun"]
    res = subprocess.run([str(ROOT / "scripts" / "train.sh"), *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=240, check=False, env={**env(), "NPROC_PER_NODE": "2", "PYTHONPATH": ""})
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert store.is_dir() and not os.path.exists(ROOT / "sweep")
    for member in ("0", "1"):
        result = json.loads((tmp_path / "sweep" / member / "result.json").read_text())
        assert result["epochs"] == 1 and result["world_size"] == 2


def test_train_sh_passes_hydra_flags_through(tmp_path):
    """--cfg job / --help were refused as unknown launcher options."""
    import subprocess

    from tests.train_utils import ROOT, env

    res = subprocess.run([str(ROOT / "scripts" / "train.sh"), "--cfg", "job", "data.store=/somewhere", "model.n_latent=5"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                         env={**env(), "NPROC_PER_NODE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "store: /somewhere" in res.stdout and "n_latent: 5" in res.stdout
    bad = subprocess.run([str(ROOT / "scripts" / "train.sh"), "--bogus"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=False, env=env())
    assert bad.returncode == 2 and "unknown launcher option --bogus" in bad.stderr


@pytest.mark.slow
def test_two_member_multirun_with_deepspeed(tmp_path):
    """DeepSpeed keeps a clone of the world group (deepspeed.utils.groups); the first member's teardown
    destroyed the group under it, and the second member's deepspeed.initialize failed on the dead clone:
    "ValueError: Group ... is not registered"."""
    store = tiny_store(tmp_path / "store", n_cells=300)
    ov = tiny_overrides(store, tmp_path / "sweep", **{"run.epochs": 1, "dist.backend": "deepspeed",
                                                       "dist.zero_stage": 1})
    train_cli({**ov, "model": {**ov["model"], "n_latent": "4,7"}}, "--multirun", timeout=400)
    for member, n_latent in (("0", 4), ("1", 7)):
        run = tmp_path / "sweep" / member
        assert json.loads((run / "result.json").read_text())["epochs"] == 1
        assert json.loads((run / "model" / "model.json").read_text())["model_args"]["n_latent"] == n_latent
