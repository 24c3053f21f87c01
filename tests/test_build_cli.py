"""The Hydra entry points as users run them, and builds killed halfway.

Run: .venv/bin/python -m pytest tests/test_build_cli.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.store import StoreError, open_store

DATA = Path("/work/shared/data/neurips2021_bmmc_multiome_starter")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=120,
                          check=False)


def test_mva_build_cli_h5ad_pair(tmp_path):
    out = tmp_path / "bmmc.zarr"
    r = _run(["-m", "data.build", f"out={out}", "label_key=cell_type", "shard_size=200", "progress=false",
              (f"inputs=[{{kind: h5ad_pair, rna: {DATA / 'bmmc_starter_rna.h5ad'}, "
               f"atac: {DATA / 'bmmc_starter_atac.h5ad'}}}]")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    st = open_store(out)
    assert (st.meta.n_cells, st.meta.n_genes, st.meta.n_regions, st.meta.n_shards) == (500, 600, 600, 3)
    assert st.meta.label_key == "cell_type" and len(st.meta.label_categories) > 5
    assert not list(tmp_path.glob("*.log")) and not (tmp_path / "outputs").exists()  # hydra writes nothing


def test_mva_build_cli_rejects_unknown_key_and_missing_out(tmp_path):
    r = _run(["-m", "data.build", "out=x.zarr", "shard_sise=10"], tmp_path)
    assert r.returncode != 0 and "shard_sise" in r.stderr
    r = _run(["-m", "data.build"], tmp_path)
    assert r.returncode != 0 and "out" in r.stderr


def _kill_when(proc, tmp_path, pattern, timeout=90):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list(tmp_path.glob(pattern)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    proc.kill()
    return False


@pytest.mark.slow
def test_synth_killed_halfway_leaves_no_valid_store(tmp_path):
    out = tmp_path / "big.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "data.synthetic", f"out={out}", "n_cells=400000", "n_genes=60",
                             "n_regions=300", "shard_size=4000", "block_size=4000", "progress=false"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _kill_when(proc, tmp_path, "big.zarr.tmp-*/shards/00002"), "build finished or never started"
    assert not out.exists()
    tmp = next(tmp_path.glob("big.zarr.tmp-*"))
    with pytest.raises(StoreError, match="temporary"):
        open_store(tmp)
    # Even renamed by hand, the half-written store is refused: complete is not true.
    tmp.rename(tmp_path / "renamed.zarr")
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "renamed.zarr")
    with pytest.raises(StoreError):
        open_store(out)


@pytest.mark.slow
def test_preshuffle_build_killed_halfway_leaves_only_its_tmp_dir_and_the_rerun_removes_it(tmp_path):
    # The spill files of preshuffle went to an mva-shuffle-* dir next to the output (a full copy of the input
    # that nothing removed after a kill); now they live inside the refused <out>.tmp-* dir.
    out = tmp_path / "s.zarr"
    args = ["-m", "data.build", f"out={out}", "preshuffle=true", "shard_size=50", "block_size=5", "progress=false",
            f"inputs=[{{kind: h5ad_pair, rna: {DATA / 'bmmc_starter_rna.h5ad'}, atac: {DATA / 'bmmc_starter_atac.h5ad'}}}]"]
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert _kill_when(proc, tmp_path, "**/mva-shuffle-*/*.obs.parquet"), "build finished or never started"
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith("s.zarr.tmp-"), left
    r = _run(args, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert open_store(out).meta.n_cells == 500
    # the killed build's tmp dir (its owner mark names a process that no longer runs) is removed, and said so
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"] and f"removed {left[0]}" in r.stderr
