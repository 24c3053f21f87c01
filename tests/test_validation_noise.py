"""Validation posterior noise keyed by the cell (``trainer.validation.cell_noise``): the same draw for a cell at
every validation, in any batch, on any number of ranks, so a run validates the same on 1 and on N processes
and epoch-to-epoch differences are not noise of two independent draws.

    .venv/bin/python -m pytest tests/test_validation_noise.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from data.stream import StoreStream
from tests.train_utils import tiny_config, tiny_store
from trainer.export import build_module
from trainer.validation import cell_noise, validate


def test_noise_is_a_function_of_seed_and_row_and_standard_normal():
    rows = torch.arange(100_000)
    e = cell_noise(0, rows, 10)
    assert e.shape == (100_000, 10) and e.dtype == torch.float32 and torch.isfinite(e).all()
    flat = e.numpy().ravel()
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01
    assert stats.kstest(flat, "norm").pvalue > 1e-3  # (deterministic: the same numbers every run)
    corr = np.corrcoef(e.numpy()[:, :4].T)
    assert np.abs(corr - np.eye(4)).max() < 0.02  # latent dimensions independent
    # a cell's draw does not depend on which cells share its batch, nor on their order
    picked = torch.tensor([99_999, 3, 51_234])
    assert torch.equal(cell_noise(0, picked, 10), e[picked])
    assert not torch.equal(cell_noise(1, picked, 10), e[picked])  # another run seed, other draws
    assert not torch.equal(cell_noise(0, picked, 12)[:, :10], e[picked])  # n_latent is part of the key


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store", n_cells=400)


def _validate(module, store, batch):
    stream = StoreStream(store, batch, split="validation", shuffle=False, chunk_size=16, prefetch=0,
                         val_fraction=0.3)
    return validate(module, stream, torch.device("cpu"), 1.0, seed=5)


def test_validation_does_not_depend_on_batching_and_repeats_exactly(store, tmp_path):
    """Other batch sizes group the cells otherwise (as other world sizes do); the validation used to draw each
    batch's noise from the RNG in order, so it changed with the grouping and with every call."""
    torch.manual_seed(0)
    module = build_module(StoreStream(store, 8, prefetch=0).meta, tiny_config(store, tmp_path / "r"))
    a, b, c = _validate(module, store, 16), _validate(module, store, 7), _validate(module, store, 16)
    assert a == c  # bit for bit: the same draws every validation
    assert a["n_validation"] == b["n_validation"] > 50
    for k in ("reconstruction_loss_validation", "elbo_validation", "kl_validation"):
        assert b[k] == pytest.approx(a[k], rel=1e-6), k
