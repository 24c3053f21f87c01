"""A real 2-process ``torchrun`` job streams a store: train cells disjoint, complete, equal counts per rank.

Run: .venv/bin/python -m pytest tests/test_stream_torchrun.py -q   (~20 s: torchrun start-up dominates)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.stream import StoreStream
from data.synthetic import write_synthetic_store

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(store, out, batch_size, split):
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_stream_worker.py"), str(store), str(out), str(batch_size), split]
    res = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return ([np.load(out / f"rank{r}.npy") for r in range(2)],
            [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)])


@pytest.mark.slow
def test_two_process_torchrun_train_and_inference(tmp_path):
    store = write_synthetic_store(tmp_path / "s.zarr", n_cells=3001, n_genes=50, n_regions=200, seed=9,
                                  shard_size=777, progress=False)
    cells, info = _torchrun(store, tmp_path / "train", 64, "train")
    train = np.flatnonzero(StoreStream(store, 64, world_size=2).eligible)
    assert info[0]["n_batches"] == info[1]["n_batches"] == info[0]["len"] > 0
    assert not set(cells[0].tolist()) & set(cells[1].tolist()), "ranks overlap"
    union = np.concatenate(cells)
    assert np.isin(union, train).all()
    # data.remainder=even (the default): every training cell exactly once over both ranks, nothing dropped
    assert np.array_equal(np.sort(union), train) and info[0]["n_dropped"] == 0
    # Inference mode in the same job shape: contiguous blocks that concatenate to the whole store.
    cells, _ = _torchrun(store, tmp_path / "all", 100, "all")
    assert np.array_equal(np.concatenate(cells), np.arange(3001))
