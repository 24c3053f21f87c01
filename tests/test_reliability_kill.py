"""SIGKILL (a real kill of the real CLI, not an exception) during ``mva-build``, ``mva-infer embed`` and
``mva-infer de`` (expression / accessibility: tests/test_infer_expression.py, test_infer_accessibility.py):
nothing valid-looking is left and the same command then completes correctly. (``mva-synth`` killed
halfway: tests/test_build_cli.py; training and checkpoints: tests/test_train.py,
tests/test_reliability_checkpoint.py.)

    .venv/bin/python -m pytest tests/test_reliability_kill.py -q
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from data.store import StoreError, open_store
from tests.train_utils import PY, ROOT, env, tiny_config, tiny_store
from trainer.train import train

pytestmark = pytest.mark.slow

BMMC = Path("/work/shared/data/neurips2021_bmmc_multiome_starter")


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, f"finished before the kill point:\n{proc.stderr.read()[-2000:]}"
        time.sleep(0.01)
    proc.kill()
    pytest.fail("kill point not reached")


def _rerun_and_clean_run(cmd, out: Path, clean: Path) -> None:
    """The killed command rerun to completion, then the same job from scratch into ``clean``."""
    for path in (out, clean):
        r = subprocess.run(cmd(path), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400, check=False)
        assert r.returncode == 0, r.stderr[-3000:]


def test_sigkill_during_mva_build_leaves_nothing_valid_and_the_rerun_completes(tmp_path):
    out = tmp_path / "bmmc.zarr"
    cmd = [PY, "-m", "data.build", f"out={out}", "shard_size=25", "progress=false",
           (f"inputs=[{{kind: h5ad_pair, rna: {BMMC / 'bmmc_starter_rna.h5ad'}, "
           f"atac: {BMMC / 'bmmc_starter_atac.h5ad'}}}]")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: bool(list(tmp_path.glob("bmmc.zarr.tmp-*/shards/00003"))))
    assert not out.exists()
    (tmp,) = tmp_path.glob("bmmc.zarr.tmp-*")
    with pytest.raises(StoreError, match="temporary"):
        open_store(tmp)
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    st = open_store(out)
    assert st.meta.n_cells == 500 and st.meta.n_shards == 20
    assert st.read_rows("rna", 19, 0, 25).shape == (25, st.meta.n_genes)


def test_sigkill_during_mva_infer_embed_leaves_no_output_and_the_rerun_equals_a_clean_run(tmp_path):
    store = tiny_store(tmp_path / "store", n_cells=3000)
    run = tmp_path / "run"
    train(tiny_config(store, run, **{"run.epochs": 1, "run.max_steps": 3}))

    def cmd(out: Path) -> list[str]:
        return [PY, "-m", "trainer.infer", f"model_dir={run}", f"store={store}", f"output={out}", "batch_size=32",
                "progress=false"]

    out = tmp_path / "emb.zarr"
    progress = tmp_path / "emb.zarr.progress"
    proc = subprocess.Popen(cmd(out), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _kill_when(proc, lambda: len(list(progress.glob("chunk-*.done"))) >= 3)
    assert not out.exists()  # only the final name means complete; the partial output is not it
    partial = tmp_path / "emb.zarr.partial"
    assert partial.exists() and not (partial / "zarr.json").read_text().count('"mva_complete": true')
    clean = tmp_path / "clean.zarr"
    _rerun_and_clean_run(cmd, out, clean)
    a, b = ad.read_zarr(out), ad.read_zarr(clean)
    assert list(a.obs_names) == list(b.obs_names) and a.n_obs == 3000
    for key in b.obsm:
        np.testing.assert_array_equal(np.asarray(a.obsm[key]), np.asarray(b.obsm[key]))


def test_sigkill_during_mva_infer_de_leaves_no_table_and_the_rerun_equals_a_clean_run(tmp_path):
    import pandas as pd

    store = tiny_store(tmp_path / "store", n_cells=600)
    run = tmp_path / "run"
    train(tiny_config(store, run, **{"run.epochs": 1, "run.max_steps": 3}))

    def cmd(out: Path) -> list[str]:
        # one-vs-rest over every cell type: one comparison (one part file) at a time
        return [PY, "-m", "trainer.infer", "job=de", f"model_dir={run}", f"store={store}", f"output={out}",
                "de.groupby=cell_type", "de.n_samples_overall=200", "batch_size=128", "progress=false"]

    out = tmp_path / "de.csv"
    parts = tmp_path / "de.csv.parts"
    proc = subprocess.Popen(cmd(out), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _kill_when(proc, lambda: len(list(parts.glob("comp-*.parquet"))) >= 1)
    assert not out.exists() and not list(tmp_path.glob("de.csv.tmp*"))  # no table that looks complete
    clean = tmp_path / "clean.csv"
    _rerun_and_clean_run(cmd, out, clean)
    a, b = pd.read_csv(out), pd.read_csv(clean)
    assert len(a) == len(b) and a["comparison"].nunique() >= 2 and not parts.exists()
    pd.testing.assert_frame_equal(a, b)
