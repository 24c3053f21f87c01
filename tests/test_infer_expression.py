"""mva-infer job=expression on a model trained by the real trainer, against the reference (scvi-tools
MULTIVI holding the same weights, on the same cells) and against itself (crash + rerun, float16, subsets).

    .venv/bin/python -m pytest tests/test_infer_expression.py -q
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr

from tests.infer_utils import N_CELLS, infer_cfg, reference_model, store_arrays, trained_model
from trainer.infer import infer
from trainer.infer_config import ExpressionOptions
from trainer.jobs import common
from trainer.jobs.common import InferError
from trainer.jobs.runner import FAIL_AFTER_ENV

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

TOL = {"rtol": 1e-4, "atol": 1e-7}  # float32 on both sides; rho ~ 1/100

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


def _run(store, run, out, **opts) -> ad.AnnData:
    infer(infer_cfg(store, run, out, job="expression", expression=ExpressionOptions(**opts)))
    return ad.read_zarr(str(out))


def test_expression_equals_the_reference_with_and_without_transform_batch(trained, tmp_path):
    store, run = trained
    model, mdata = reference_model(store, run / "model")
    got = _run(store, run, tmp_path / "own.zarr")
    assert got.shape == (N_CELLS, 100) and got.X.dtype == np.float32
    assert list(got.var_names) == list(mdata["rna"].var_names)
    assert list(got.obs_names) == list(mdata.obs_names)  # store order
    assert zarr.open_group(str(tmp_path / "own.zarr"), mode="r").attrs["mva_complete"] is True
    np.testing.assert_allclose(got.X, model.get_normalized_expression(return_numpy=True), **TOL)
    np.testing.assert_allclose(got.X.sum(1), 1.0, rtol=1e-5)  # rho: rows sum to one

    one = _run(store, run, tmp_path / "b1.zarr", transform_batch="batch_1")  # one label, no list
    ref_one = model.get_normalized_expression(transform_batch="batch_1", return_numpy=True)
    np.testing.assert_allclose(one.X, ref_one, **TOL)
    assert np.abs(one.X - got.X).max() > 1e-4  # the batch changes something
    # a list is averaged (as the reference does for expression); codes mean the same as labels
    both = _run(store, run, tmp_path / "b01.zarr", transform_batch=[0, "batch_1"])
    ref_both = model.get_normalized_expression(transform_batch=["batch_0", "batch_1"], return_numpy=True)
    np.testing.assert_allclose(both.X, ref_both, **TOL)
    assert both.uns["multivi"]["transform_batch"].tolist() == ["batch_0", "batch_1"]


def test_gene_subset_in_given_order_library_size_and_float16(trained, tmp_path):
    store, run = trained
    model, _ = reference_model(store, run / "model")
    full = model.get_normalized_expression(return_numpy=False)
    genes = ["gene_00042", "gene_00007", "gene_00099"]
    sub = _run(store, run, tmp_path / "sub.zarr", genes=genes, library_size=1e4)
    assert list(sub.var_names) == genes  # the given order, not the model's
    np.testing.assert_allclose(sub.X, 1e4 * full[genes].to_numpy(), rtol=1e-4)
    half = _run(store, run, tmp_path / "half.zarr", dtype="float16")
    assert half.X.dtype == np.float16
    np.testing.assert_allclose(half.X.astype(np.float32), full.to_numpy(), rtol=2e-3, atol=1e-6)
    obs = _run(store, run, tmp_path / "obs.zarr", library_size="observed")
    totals = store_arrays(store)[1].sum(1)
    has_rna = obs.obs["mask_rna"].to_numpy(bool)
    # observed: rows sum to the cell's own RNA count (cells without RNA: the model's library, positive)
    np.testing.assert_allclose(obs.X.sum(1)[has_rna], totals[has_rna], rtol=1e-4)
    assert (obs.X.sum(1)[~has_rna] > 0).all()


def test_posterior_draws_are_averaged_and_reproducible(trained, tmp_path, monkeypatch):
    store, run = trained
    mean = _run(store, run, tmp_path / "mean.zarr").X
    infer(infer_cfg(store, run, tmp_path / "s.zarr", job="expression", give_mean=False, n_samples=4, seed=3))
    draws = ad.read_zarr(str(tmp_path / "s.zarr")).X
    assert draws.shape == mean.shape and np.isfinite(draws).all()
    assert np.abs(draws - mean).max() > 1e-5  # not the mean's decoding
    np.testing.assert_allclose(draws.sum(1), 1.0, rtol=1e-5)
    infer(infer_cfg(store, run, tmp_path / "s2.zarr", job="expression", give_mean=False, n_samples=4, seed=3))
    np.testing.assert_array_equal(ad.read_zarr(str(tmp_path / "s2.zarr")).X, draws)
    # draws decoded in groups (bounded memory): one draw per decoder call here, the same average
    monkeypatch.setattr(common, "MAX_DECODE_ELEMENTS", 1)
    infer(infer_cfg(store, run, tmp_path / "s3.zarr", job="expression", give_mean=False, n_samples=4, seed=3))
    grouped = ad.read_zarr(str(tmp_path / "s3.zarr")).X
    np.testing.assert_allclose(grouped.sum(1), 1.0, rtol=1e-5)
    # other random draws (the generator is consumed per group), the same Monte Carlo error around the mean
    assert np.abs(grouped - mean).mean() < 1.5 * np.abs(draws - mean).mean()


def test_average_of_draws_in_groups_is_the_overall_average(monkeypatch):
    import torch

    calls = []

    def decode(n):  # draw i is the constant i: the average of n consecutive draws
        start = sum(calls)
        calls.append(n)
        return torch.full((2, 3), float(np.mean(np.arange(start, start + n))))

    monkeypatch.setattr(common, "MAX_DECODE_ELEMENTS", 2 * 6)  # 2 cells x 6 features: 1 draw per call
    assert float(common.average_of_draws(decode, 5, rows=2, width=6)[0, 0]) == pytest.approx(2.0)
    assert calls == [1, 1, 1, 1, 1]
    calls.clear()
    monkeypatch.setattr(common, "MAX_DECODE_ELEMENTS", 3 * 2 * 6)  # 3 draws per call: groups 3 + 2
    assert float(common.average_of_draws(decode, 5, rows=2, width=6)[1, 2]) == pytest.approx(2.0)
    assert calls == [3, 2]


def test_crash_and_rerun_equals_a_clean_run_with_column_chunks(trained, tmp_path, monkeypatch):
    store, run = trained
    clean = _run(store, run, tmp_path / "clean.zarr", genes=[f"gene_{i:05d}" for i in range(0, 100, 2)])
    # a bounded column width: 96 rows x 960 elements -> 10-column chunks, so a row block spans 5 chunks
    monkeypatch.setattr(common, "MAX_CHUNK_ELEMENTS", 960)
    out = tmp_path / "x.zarr"
    # a tuple, as a Python caller may pass it: job.json holds a list, and the resume must still match
    cfg = infer_cfg(store, run, out, job="expression",
                    expression=ExpressionOptions(genes=tuple(f"gene_{i:05d}" for i in range(0, 100, 2))))
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(cfg)
    assert not out.exists()
    monkeypatch.delenv(FAIL_AFTER_ENV)
    summary = infer(cfg)
    assert summary["chunks_skipped"] == 3 and summary["chunks_written"] == 5
    assert zarr.open_group(str(out), mode="r")["X"].chunks == (96, 10)
    got = ad.read_zarr(str(out))
    assert got.obs_names.is_unique and got.n_obs == N_CELLS and not np.isnan(got.X).any()
    pd.testing.assert_frame_equal(got.obs, clean.obs)
    np.testing.assert_array_equal(got.X, clean.X)


def test_a_locked_output_is_refused_and_a_stale_lock_cleared(trained, tmp_path, monkeypatch):
    import subprocess
    import sys

    from trainer import lock

    store, run = trained
    out = tmp_path / "x.zarr"
    held = lock.acquire(tmp_path / "x.zarr.progress", "another job")  # a live holder: this process
    with pytest.raises(InferError, match="in use by another job"):
        infer(infer_cfg(store, run, out, job="expression"))
    held.release()
    # a job killed with SIGKILL leaves its lock behind: its pid is gone, so the rerun clears it
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(infer_cfg(store, run, out, job="expression"))
    monkeypatch.delenv(FAIL_AFTER_ENV)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    record = lock._record("mva-infer (killed)")
    record.update(pid=int(dead.stdout), start_time=1)
    (tmp_path / "x.zarr.progress" / lock.LOCK_NAME).write_text(__import__("json").dumps(record))
    summary = infer(infer_cfg(store, run, out, job="expression"))
    assert summary["chunks_skipped"] == 2 and out.is_dir() and not (tmp_path / "x.zarr.progress").exists()


def test_bad_expression_inputs_give_one_line(trained, tmp_path):
    store, run = trained
    cases = [({"genes": ["gene_00001", "NOPE1", "NOPE2"]}, r"2 unknown gene name\(s\).*NOPE1.*NOPE2"),
             ({"genes": ["gene_00001", "gene_00001"]}, "more than once"),
             ({"transform_batch": ["batch_9"]}, r"unknown batch label 'batch_9'.*batch_0"),
             ({"transform_batch": [7]}, r"batch code 7 .*out of range"),
             ({"transform_batch": 1.5}, r"labels or integer codes, got 1.5"),  # was a TypeError traceback
             ({"dtype": "float64"}, r"expression.dtype must be one of \['float32', 'float16'\]"),
             ({"library_size": -1.0}, "library_size must be a positive number"),
             ({"library_size": "counts"}, "library_size must be a positive number")]
    for opts, match in cases:
        with pytest.raises(InferError, match=match) as exc:
            _run(store, run, tmp_path / "bad.zarr", **opts)
        assert "\n" not in str(exc.value)
        assert not (tmp_path / "bad.zarr").exists() and not (tmp_path / "bad.zarr.partial").exists()


def test_float16_overflow_is_refused_not_written_as_inf(trained, tmp_path):
    store, run = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow RuntimeWarning came before the one line
        with pytest.raises(InferError, match=r"float16 cannot hold .* rerun with expression.dtype=float32 .*overwrite=true"):
            _run(store, run, tmp_path / "big.zarr", dtype="float16", library_size=1e7)
    assert not (tmp_path / "big.zarr").exists()
    # the advice works as given (without overwrite=true the unfinished output's settings are in the way)
    infer(infer_cfg(store, run, tmp_path / "big.zarr", job="expression", overwrite=True,
                    expression=ExpressionOptions(dtype="float32", library_size=1e7)))
    assert ad.read_zarr(str(tmp_path / "big.zarr")).X.dtype == np.float32


def test_an_integer_that_is_a_batch_label_means_that_label():
    """The store keeps labels as text: a model trained on integer donor ids has labels "1", "2", and the
    command line's transform_batch=1 arrives as the int 1 -- the batch labelled "1", not code 1."""
    assert common.batch_codes(1, ["1", "2"], 2) == [0]
    assert common.batch_codes([2, "1"], ["1", "2"], 2) == [1, 0]
    assert common.batch_codes(1, ["batch_0", "batch_1"], 2) == [1]  # not a label: a code
    with pytest.raises(InferError, match="out of range"):
        common.batch_codes(3, ["1", "2"], 2)


def test_transform_batch_with_encode_covariates_equals_the_reference(trained, tmp_path):
    """The reference overwrites the batch in the minibatch, so with encode_covariates its encoders see
    transform_batch too (ours changed only the decoder's batch: ~30 % off); accessibility changes only
    the decoder's batch on both sides."""
    from tests.train_utils import tiny_config
    from trainer.train import train

    store, _ = trained
    res = train(tiny_config(store, tmp_path / "enc", **{"model.encode_covariates": True, "run.epochs": 1}))
    run = tmp_path / "enc"
    model, _ = reference_model(store, run / "model")
    for tb in ("batch_1", ["batch_0", "batch_1"]):
        got = _run(store, res.run_dir, tmp_path / f"e{len(tb)}.zarr", transform_batch=tb)
        np.testing.assert_allclose(got.X, model.get_normalized_expression(transform_batch=tb, return_numpy=True),
                                   **TOL)
    own = _run(store, res.run_dir, tmp_path / "own.zarr")
    np.testing.assert_allclose(own.X, model.get_normalized_expression(return_numpy=True), **TOL)
