"""Checkpoints and other files handed to us damaged, malformed or crafted (each a case found in review):
one-line errors instead of tracebacks, no path around the pickle check, no rollback that loses work.

    .venv/bin/python -m pytest tests/test_checkpoint_hardening.py -q
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tests.train_utils import tiny_config, tiny_store
from trainer import checkpoint as ckpt
from trainer.config import ConfigError
from trainer.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    store = tiny_store(root / "store", n_cells=400)
    train(tiny_config(store, root / "run", **{"run.epochs": 2, "run.checkpoint_every_steps": 2,
                                              "run.keep_checkpoints": 0}))
    return store, root / "run"


def _copy(run, tmp_path) -> tuple[Path, Path]:
    store, src = run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return store, dst


def _drop_tensor_record(f: Path) -> None:
    tmp = f.with_name("x.zip")
    with zipfile.ZipFile(f) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for i in zin.infolist():
            if not i.filename.endswith("/data/0"):
                zout.writestr(i, zin.read(i.filename))
    tmp.replace(f)


@pytest.mark.parametrize("damage", ["tensor_record", "not_a_dict", "missing_key", "model_without_optimizer"])
def test_a_damaged_checkpoint_is_one_checkpoint_error(run, tmp_path, damage):
    store, dst = _copy(run, tmp_path)
    step = ckpt.complete_checkpoints(dst)[-1]
    if damage == "tensor_record":  # passes the pickle scan (it reads data.pkl only), fails in the zip reader
        _drop_tensor_record(step / "rank_0.pt")
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], step / "trainer.pt")
    elif damage == "missing_key":
        state = torch.load(step / "trainer.pt", weights_only=True)
        del state["world_size"]
        torch.save(state, step / "trainer.pt")
    else:
        state = torch.load(step / "model.pt", weights_only=True)
        del state["optimizer"]
        torch.save(state, step / "model.pt")
    with pytest.raises(ckpt.CheckpointError, match=str(step)):
        train(tiny_config(store, dst, **{"run.epochs": 3}))


def test_a_symlink_inside_a_checkpoint_is_refused(run, tmp_path):
    """rglob does not enter a linked directory, so a linked deepspeed/ dir skipped the pickle scan and
    reached DeepSpeed's own (not weights-only) loader."""
    _store, dst = _copy(run, tmp_path)
    step = ckpt.complete_checkpoints(dst)[-1]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, step / "deepspeed")
    with pytest.raises(ckpt.CheckpointError, match="symbolic link"):
        ckpt.load_states(step, 0, 1)


def test_rolling_back_to_an_older_checkpoint_does_not_lose_the_new_run(run, tmp_path):
    """Pruning keeps the highest steps: a run resumed from step 4 in a directory holding steps up to 10 had
    its own checkpoints deleted as written, and resume=auto then loaded the abandoned step 10."""
    store, dst = _copy(run, tmp_path)
    older = ckpt.complete_checkpoints(dst)[1]
    before = ckpt.complete_checkpoints(dst)
    with pytest.raises(ConfigError, match="holds newer checkpoints"):
        train(tiny_config(store, dst, **{"run.resume": str(older), "run.epochs": 3}))
    assert ckpt.complete_checkpoints(dst) == before
    res = train(tiny_config(store, tmp_path / "fresh", **{"run.resume": str(older), "run.epochs": 3}))
    assert res.epochs == 3  # into another run dir the same checkpoint resumes


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_bad_read_retry_settings_are_named(monkeypatch, value):
    from data import retry

    monkeypatch.setenv(retry.RETRIES_ENV, value)
    with pytest.raises(ValueError, match=f"MVA_READ_RETRIES='{value}'"):
        retry.retries()


def test_a_malformed_scvi_save_is_one_error(tmp_path):
    from trainer.scvi_io import ScviIOError, import_from_scvi

    ck = {"model_state_dict": {}, "var_names": [], "attr_dict": {
        "registry_": {"model_name": "MULTIVI", "field_registries": {}}, "init_params_": {"non_kwargs": {}}}}
    (tmp_path / "scvi").mkdir()
    torch.save(ck, tmp_path / "scvi" / "model.pt")
    with pytest.raises(ScviIOError, match="not a complete scvi-tools MULTIVI save"):
        import_from_scvi(tmp_path / "scvi", tmp_path / "ours")


def test_resuming_with_other_settings_is_refused_by_name(run, tmp_path):
    """The optimizer state carries the learning rate: resumed with optim.lr=0.5 the run silently kept the
    old rate while config.yaml said 0.5. Settings that shape training are refused by name; how long and
    where the run goes may change."""
    store, dst = _copy(run, tmp_path)
    cfg_before = (dst / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim\.lr \(0\.001 -> 0\.5\), run\.seed \(0 -> 3\)"):
        train(tiny_config(store, dst, **{"run.epochs": 3, "optim.lr": 0.5, "run.seed": 3}))
    assert (dst / "config.yaml").read_text() == cfg_before  # refused before anything was rewritten
    res = train(tiny_config(store, dst, **{"run.epochs": 3, "run.keep_checkpoints": 1, "logger.log_every": 1}))
    assert res.epochs == 3
