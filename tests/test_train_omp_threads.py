"""mva-train and mva-infer read OMP_NUM_THREADS as OpenMP does: a nested list ("2,1") and an empty value are valid.

    .venv/bin/python -m pytest tests/test_train_omp_threads.py -q
"""

from __future__ import annotations

import subprocess

import pytest

from tests.train_utils import PY, ROOT, env


@pytest.mark.parametrize("threads", ["2,1", ""])
def test_a_valid_omp_num_threads_does_not_crash_mva_train(tmp_path, threads):
    """int(os.environ["OMP_NUM_THREADS"]) raised ValueError (a Hydra traceback, status 1) for OpenMP's nested
    form "2,1" and for an empty value, before the run even looked at its store."""
    res = subprocess.run([PY, "-m", "trainer.train", f"data.store={tmp_path / 'no_store'}",
                          f"run.output_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False, env={**env(), "OMP_NUM_THREADS": threads})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "ValueError" not in res.stderr and "mva-train: error:" in res.stderr and "no_store" in res.stderr, \
        res.stderr[-2000:]


@pytest.mark.parametrize("threads", ["2,1", ""])
def test_a_valid_omp_num_threads_does_not_crash_mva_infer(tmp_path, threads):
    res = subprocess.run([PY, "-m", "trainer.infer", "job=embed", f"model_dir={tmp_path / 'no_model'}",
                          f"store={tmp_path / 'no_store'}", f"output={tmp_path / 'e.zarr'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**env(), "OMP_NUM_THREADS": threads})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "ValueError" not in res.stderr and "mva-infer: error:" in res.stderr and "no_model" in res.stderr, \
        res.stderr[-2000:]


def test_thread_count_follows_the_first_level():
    from data.cli import omp_threads

    assert [omp_threads(v) for v in ("3", "2,1", " 4 ", "", "x", "0", None)] == [3, 2, 4, 1, 1, 1, 1]
