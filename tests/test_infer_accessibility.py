"""mva-infer job=accessibility against the reference (scvi-tools MULTIVI with the same weights on the same
cells), its sparse (threshold) and uint8 outputs against its float32 output, crash + rerun, bad input,
and (slow) 2-rank torchrun output == 1-rank output for both new jobs.

    .venv/bin/python -m pytest tests/test_infer_accessibility.py -q     # -m 'not slow' skips torchrun
"""

from __future__ import annotations

import signal
import subprocess

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from tests.infer_utils import BATCH, N_CELLS, infer_cfg, reference_model, trained_model
from tests.train_utils import PY, ROOT, env, torchrun
from trainer import lock
from trainer.infer import infer
from trainer.infer_config import AccessibilityOptions, ExpressionOptions
from trainer.jobs import runner
from trainer.jobs.common import InferError
from trainer.jobs.runner import FAIL_AFTER_ENV

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

TOL = {"rtol": 1e-4, "atol": 1e-6}

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


def _run(store, run, out, **opts) -> ad.AnnData:
    infer(infer_cfg(store, run, out, job="accessibility", accessibility=AccessibilityOptions(**opts)))
    return ad.read_zarr(str(out))


@pytest.fixture(scope="module")
def dense(trained, tmp_path_factory) -> np.ndarray:
    """The float32 output with default settings (what the sparse and uint8 outputs are checked against)."""
    store, run = trained
    return np.asarray(_run(store, run, tmp_path_factory.mktemp("acc") / "dense.zarr").X)


def test_accessibility_equals_the_reference_with_the_normalize_flags(trained, dense, tmp_path):
    store, run = trained
    model, mdata = reference_model(store, run / "model")
    assert dense.shape == (N_CELLS, 300) and dense.dtype == np.float32
    np.testing.assert_allclose(dense, model.get_normalized_accessibility(return_numpy=True), **TOL)
    for cells, regions in ((True, False), (False, True), (True, True)):
        got = _run(store, run, tmp_path / f"n{cells:d}{regions:d}.zarr", normalize_cells=cells,
                   normalize_regions=regions)
        assert list(got.var_names) == list(mdata["atac"].var_names)
        ref = model.get_normalized_accessibility(normalize_cells=cells, normalize_regions=regions, return_numpy=True)
        np.testing.assert_allclose(got.X, ref, **TOL, err_msg=f"cells={cells} regions={regions}")
        assert np.abs(got.X - dense).max() > 1e-3
    # one batch label: the reference conditions the decoder on it (it uses only a list's first element)
    got = _run(store, run, tmp_path / "b0.zarr", transform_batch=["batch_0"])
    np.testing.assert_allclose(got.X, model.get_normalized_accessibility(transform_batch="batch_0",
                                                                          return_numpy=True), **TOL)
    assert np.abs(got.X - dense).max() > 1e-4


def test_region_subset_threshold_sparse_and_uint8_against_float32(trained, dense, tmp_path):
    store, run = trained
    model, mdata = reference_model(store, run / "model")
    names = list(mdata["atac"].var_names)
    pick = [250, 3, 77, 140]
    sub = _run(store, run, tmp_path / "sub.zarr", regions=[names[i] for i in pick])
    assert list(sub.var_names) == [names[i] for i in pick]  # the given order
    np.testing.assert_array_equal(sub.X, dense[:, pick])

    t = float(np.quantile(dense, 0.8))  # keeps about a fifth of the values
    kept = np.where(dense >= t, dense, 0)
    s = _run(store, run, tmp_path / "sparse.zarr", threshold=t)
    assert isinstance(s.X, sp.csr_matrix) and s.X.shape == dense.shape and s.X.dtype == np.float32
    assert s.X.nnz == int((dense >= t).sum()) and 0.1 < s.X.nnz / dense.size < 0.3
    s.X.check_format(full_check=True)  # sorted, in-range indices; indptr consistent with data
    np.testing.assert_array_equal(s.X.toarray(), kept)
    ref = model.get_normalized_accessibility(threshold=t, return_numpy=True)  # the reference keeps p >= t too
    np.testing.assert_allclose(s.X.toarray(), ref.toarray(), **TOL)
    assert s.uns["multivi"]["threshold"] == t

    q = _run(store, run, tmp_path / "u8.zarr", dtype="uint8")
    assert q.X.dtype == np.uint8 and q.uns["multivi"]["scale"] == pytest.approx(1 / 255)
    assert zarr.open_group(str(tmp_path / "u8.zarr"), mode="r")["X"].attrs["mva_scale"] == pytest.approx(1 / 255)
    np.testing.assert_array_equal(q.X, np.rint(dense * 255).astype(np.uint8))
    assert np.abs(q.X * q.uns["multivi"]["scale"] - dense).max() <= 0.5 / 255 + 1e-6

    sq = _run(store, run, tmp_path / "su8.zarr", threshold=t, dtype="uint8")
    assert sq.X.dtype == np.uint8 and sq.X.nnz == s.X.nnz
    np.testing.assert_array_equal(sq.X.toarray(), np.where(dense >= t, np.rint(dense * 255), 0).astype(np.uint8))
    # threshold 0 keeps everything: a dense output, as in the reference
    assert isinstance(_run(store, run, tmp_path / "t0.zarr", threshold=0.0).X, np.ndarray)


def test_dense_float_output_is_raw_chunks_and_equals_compressed_and_zarr_written(trained, dense, tmp_path,
                                                                                  monkeypatch):
    """The default float32 X is uncompressed (written by direct_io.RawChunkWriter with O_DIRECT); lz4
    (``compress=true``) and zarr's own writes (``runner.DIRECT_WRITES = False``) hold the same values."""
    store, run = trained
    z = _run(store, run, tmp_path / "lz4.zarr", compress=True)
    np.testing.assert_array_equal(z.X, dense)
    assert z.uns["multivi"]["compressed"] is True
    assert zarr.open_group(str(tmp_path / "lz4.zarr"), mode="r")["X"].compressors
    monkeypatch.setattr(runner, "DIRECT_WRITES", False)
    plain = _run(store, run, tmp_path / "plain.zarr")
    np.testing.assert_array_equal(plain.X, dense)
    root = zarr.open_group(str(tmp_path / "plain.zarr"), mode="r")
    assert root["X"].compressors == () and plain.uns["multivi"]["compressed"] is False


def test_sparse_output_after_a_crash_equals_a_clean_run(trained, dense, tmp_path, monkeypatch, capsys):
    store, run = trained
    t = float(np.quantile(dense, 0.5))
    clean = _run(store, run, tmp_path / "clean.zarr", threshold=t)
    out = tmp_path / "s.zarr"
    cfg = infer_cfg(store, run, out, job="accessibility", accessibility=AccessibilityOptions(threshold=t))
    monkeypatch.setenv(FAIL_AFTER_ENV, "4")
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(cfg)
    assert len(list((tmp_path / "s.zarr.progress").glob("sparse-*-data.npy"))) == 4
    monkeypatch.delenv(FAIL_AFTER_ENV)
    capsys.readouterr()
    summary = infer(cfg)
    assert summary["chunks_skipped"] == 4 and summary["chunks_written"] == 4
    # the rerun says what it kept (it said nothing)
    assert f"[infer] accessibility: resuming the unfinished {out}: 4 of 8 chunks already done" in capsys.readouterr().out
    got = ad.read_zarr(str(out))
    assert got.obs_names.is_unique and got.n_obs == N_CELLS
    pd.testing.assert_frame_equal(got.obs, clean.obs)
    assert (got.X != clean.X).nnz == 0 and got.X.nnz == clean.X.nnz
    np.testing.assert_array_equal(got.X.indptr, clean.X.indptr)
    assert not (tmp_path / "s.zarr.progress").exists()  # the pieces are gone once the output is complete


def test_a_job_killed_with_sigkill_is_finished_by_a_rerun(trained, dense, tmp_path):
    """A real SIGKILL after chunk 3's sparse pieces are written but before its done marker: the rerun
    clears the dead job's lock, redoes chunk 3 only, and the output equals a clean run's."""
    store, run = trained
    t = float(np.quantile(dense, 0.5))
    clean = _run(store, run, tmp_path / "clean.zarr", threshold=t)
    out = tmp_path / "k.zarr"
    code = f"""
import os, signal
import torch
torch.set_num_threads(1)
from trainer.infer import infer
from trainer.infer_config import load_infer_config
from trainer.jobs.common import Progress
mark_done = Progress.mark_done
def mark(self, k):
    if k == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    mark_done(self, k)
Progress.mark_done = mark
infer(load_infer_config({{"model_dir": {str(run)!r}, "store": {str(store)!r}, "output": {str(out)!r},
                         "job": "accessibility", "batch_size": {BATCH}, "progress": False,
                         "accessibility": {{"threshold": {t!r}}}}}))
"""
    res = subprocess.run([PY, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    prog = tmp_path / "k.zarr.progress"
    assert (prog / lock.LOCK_NAME).is_file() and lock.stale_reason(lock.read_holder(prog)) is not None
    assert len(list(prog.glob("chunk-*.done"))) == 3 and (prog / "sparse-0000003-data.npy").is_file()
    summary = infer(infer_cfg(store, run, out, job="accessibility", accessibility=AccessibilityOptions(threshold=t)))
    assert summary["chunks_skipped"] == 3 and summary["chunks_written"] == 5
    got = ad.read_zarr(str(out))
    pd.testing.assert_frame_equal(got.obs, clean.obs)
    assert got.X.nnz == clean.X.nnz and (got.X != clean.X).nnz == 0
    assert not prog.exists()


def test_bad_accessibility_inputs_give_one_line(trained, tmp_path):
    store, run = trained
    cases = [({"regions": ["chr1:1-501", "chr99:5-6"]}, r"1 unknown region name\(s\).*chr99:5-6"),
             ({"transform_batch": ["nope"]}, "unknown batch label 'nope'"),
             ({"dtype": "int8"}, r"accessibility.dtype must be one of \['float32', 'float16', 'uint8'\]"),
             ({"threshold": 1.5}, "threshold must be between 0 and 1"),
             ({"threshold": 0.5, "dtype": "float16"}, "needs dtype float32 or uint8")]
    for opts, match in cases:
        with pytest.raises(InferError, match=match) as exc:
            _run(store, run, tmp_path / "bad.zarr", **opts)
        assert "\n" not in str(exc.value)
        assert not (tmp_path / "bad.zarr.partial").exists()


@pytest.mark.slow
def test_two_ranks_equal_one_rank_for_expression_and_sparse_accessibility(trained, dense, tmp_path):
    """Posterior draws (give_mean=false) and the sparse assembly must not depend on the world size."""
    store, run = trained
    t = float(np.quantile(dense, 0.5))
    common = [f"model_dir={run}", f"store={store}", f"batch_size={BATCH}", "progress=false"]
    jobs = {"expression": ["give_mean=false", "n_samples=2", "seed=5", "expression.genes=[gene_00003,gene_00001]"],
            "accessibility": [f"accessibility.threshold={t}", "accessibility.transform_batch=[batch_1]"]}
    for job, extra in jobs.items():
        torchrun(["-m", "trainer.infer", f"job={job}", *common, *extra, f"output={tmp_path / (job + '2.zarr')}"],
                 nproc=2)
    infer(infer_cfg(store, run, tmp_path / "expression1.zarr", job="expression", give_mean=False, n_samples=2,
                    seed=5, expression=ExpressionOptions(genes=["gene_00003", "gene_00001"])))
    infer(infer_cfg(store, run, tmp_path / "accessibility1.zarr", job="accessibility",
                    accessibility=AccessibilityOptions(threshold=t, transform_batch=["batch_1"])))
    for job in jobs:
        one, two = (ad.read_zarr(str(tmp_path / f"{job}{n}.zarr")) for n in (1, 2))
        pd.testing.assert_frame_equal(one.obs, two.obs)
        assert list(one.var_names) == list(two.var_names)
        if job == "accessibility":
            assert isinstance(two.X, sp.csr_matrix) and two.X.nnz == one.X.nnz > 0
            np.testing.assert_array_equal(two.X.indptr, one.X.indptr)
            np.testing.assert_array_equal(two.X.indices, one.X.indices)
            np.testing.assert_allclose(two.X.data, one.X.data, rtol=1e-6)
        else:
            assert list(two.var_names) == ["gene_00003", "gene_00001"] and not np.isnan(two.X).any()
            np.testing.assert_allclose(two.X, one.X, rtol=1e-6)
