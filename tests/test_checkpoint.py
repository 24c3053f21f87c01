"""Checkpoints: atomic, pickle-free (weights_only loads), RNG round trip, newest-complete selection.

    .venv/bin/python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.classifier import build_classifier
from trainer.config import load_config
from trainer.module import MultiVAE
from trainer.parallel import wrap


def _wrapped():
    torch.manual_seed(0)
    module = MultiVAE(20, 30, n_batch=2, n_hidden=8, n_latent=3)
    cfg = load_config({"data": {"store": "/x"}})
    return wrap(module, build_classifier(module), cfg.optim, cfg.dist, torch.device("cpu"), 8)


def _one_step(w):
    batch = {"rna": torch.poisson(torch.ones(8, 20)), "atac": (torch.rand(8, 30) < 0.2).float(),
             "mask": torch.ones(8, 2, dtype=torch.bool), "batch": torch.arange(8) % 2,
             "cat_covs": torch.zeros(8, 0, dtype=torch.long), "cont_covs": torch.zeros(8, 0)}
    total, out, _ = w.forward(batch, 1.0)
    w.zero_grad()
    w.backward(total)
    w.step()
    w.classifier_step(out.z, batch["batch"])


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_save_is_complete_pickle_free_and_restores_both_optimizers(tmp_path):
    w = _wrapped()
    _one_step(w)
    path = ckpt.save_checkpoint(tmp_path, 7, {"epoch": 1, "step": 7, "world_size": 1, "config": "{}"},
                                {"rng": ckpt.rng_state(), "stream": {"epoch": 1, "batches_consumed": 3}}, w)
    assert path.name == "step_000000007" and not list((tmp_path / "checkpoints").glob(".tmp*"))
    for f in path.iterdir():  # every file loads without unpickling arbitrary objects
        torch.load(f, weights_only=True)
    w2 = _wrapped()
    w2.load(path)
    for (k, a), b in zip(w.module.state_dict().items(), w2.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert w2.optimizer.state_dict()["state"][0]["step"] == 1
    assert torch.equal(w2.clf_optimizer.state_dict()["state"][0]["exp_avg"],
                       w.clf_optimizer.state_dict()["state"][0]["exp_avg"])
    state, rank_state = ckpt.load_states(path, 0, 1)
    assert state["step"] == 7 and rank_state["stream"]["batches_consumed"] == 3
    with pytest.raises(RuntimeError, match="written by 1 processes"):
        ckpt.load_states(path, 0, 2)


def test_resume_auto_takes_the_newest_complete_and_ignores_partial(tmp_path):
    w = _wrapped()
    for step in (3, 6, 9):
        ckpt.save_checkpoint(tmp_path, step, {"world_size": 1}, {}, w, keep=2)
    done = ckpt.complete_checkpoints(tmp_path)
    assert [p.name for p in done] == ["step_000000006", "step_000000009"]  # keep=2 pruned step 3
    # a SIGKILL during a save leaves a .tmp dir and maybe a final-named dir without trainer.pt
    (tmp_path / "checkpoints" / ".tmp_step_000000012").mkdir()
    (tmp_path / "checkpoints" / "step_000000015").mkdir()
    assert ckpt.find_resume(tmp_path, "auto").name == "step_000000009"
    assert ckpt.find_resume(tmp_path / "nothing_here", "auto") is None
    assert ckpt.find_resume(tmp_path, "none") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.find_resume(tmp_path, str(tmp_path / "checkpoints" / "step_000000015"))


def test_a_resume_value_that_names_no_checkpoint_lists_what_run_resume_takes(tmp_path):
    # run.resume=latest said only "is not a complete checkpoint directory"
    with pytest.raises(FileNotFoundError, match=r"run.resume='latest' names no checkpoint directory: give auto .*, "
                                                r"none .* or a checkpoint directory"):
        ckpt.find_resume(tmp_path, "latest")
    (tmp_path / "step_000000004").mkdir()
    with pytest.raises(FileNotFoundError, match=r"is not a complete checkpoint directory \(no trainer.pt\): give auto"):
        ckpt.find_resume(tmp_path, str(tmp_path / "step_000000004"))
    assert ckpt.find_resume(tmp_path, "auto") is None and ckpt.find_resume(tmp_path, "none") is None
