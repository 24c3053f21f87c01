"""scripts/bench/worker_start.py runs end to end on a tiny store, and both loaders it times stream the right
epoch: the persistent workers' first batch of every epoch is that epoch's, as the in-process stream plans it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from data.stream import StoreStream
from tests.train_utils import tiny_store

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "worker_start.py"


@pytest.mark.slow  # ~10 s: three worker spawns
def test_worker_start_benchmark_streams_each_epoch(tmp_path):
    spec = importlib.util.spec_from_file_location("worker_start", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    store = tiny_store(tmp_path / "store", n_cells=600)
    out = tmp_path / "ws.json"
    rows = mod.main(["--store", str(store), "--workers", "1", "--epochs", "2", "--batch-size", "64",
                     "--batches", "2", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    assert [(r["persistent"], r["epoch"]) for r in rows] == [(False, 0), (False, 1), (True, 0), (True, 1)]
    plan = StoreStream(store, batch_size=64, split="train", seed=0)
    for r in rows:
        assert r["first_cells"] == plan.plan(r["epoch"]).batches[0].tolist(), r
        assert r["next_batches"] == 2
