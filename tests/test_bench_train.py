"""``scripts/bench/train.py`` (ours vs scvi-tools MULTIVI over whole epochs): what its reference worker
holds while it trains, so that the published peak RSS is the reference's own, not the harness's.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_bench_train.py -q
"""

from __future__ import annotations

import gc
import importlib.util
import sys
import types
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a child process that burns ~0.3 CPU-s (as a compiler or a loader worker would)
BUSY_CHILD = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train_script", ROOT / "scripts" / "bench" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_scvi(seen: dict) -> types.ModuleType:
    """Just enough of scvi for worker_reference: its train() records what the process still holds."""

    class _Module:
        def state_dict(self):
            raise RuntimeError("fake reference: no weights to map")

    class MULTIVI:
        @staticmethod
        def setup_mudata(mdata, **kwargs):
            seen.setdefault("setup", []).append(mdata.n_obs)

        def __init__(self, mdata):
            self.n_train, self.module = mdata.n_obs, _Module()

        def train(self, **kwargs):
            gc.collect()
            seen["alive_during_train"] = [r() is not None for r in seen["full_arrays"]]
            seen["train_kwargs"] = kwargs

        def get_elbo(self, adata, batch_size):
            seen["heldout_cells"], seen["evaluated"] = adata.n_obs, True
            return -123.0

    scvi = types.ModuleType("scvi")
    scvi.model = types.SimpleNamespace(MULTIVI=MULTIVI)
    scvi.settings = types.SimpleNamespace(seed=None)
    return scvi


def test_reference_worker_frees_store_wide_arrays_before_training(tmp_path, monkeypatch):
    from data.cell_table import read_validation_mask
    from data.store import open_store
    from data.synthetic import write_synthetic_store

    store = str(tmp_path / "s.zarr")
    write_synthetic_store(store, n_cells=80, n_genes=20, n_regions=30, paired_fraction=0.5,
                          rna_only_fraction=0.25, atac_only_fraction=0.25, progress=False, overwrite=True)
    bench = _bench_train()
    seen: dict = {}
    original = bench._store_arrays

    def store_arrays(path):
        out = original(path)
        seen["full_arrays"] = [weakref.ref(out[1]), weakref.ref(out[2])]  # the store-wide RNA / ATAC CSR
        return out

    monkeypatch.setattr(bench, "_store_arrays", store_arrays)
    monkeypatch.setitem(sys.modules, "scvi", _fake_scvi(seen))
    # what ru_maxrss would say: the held-out evaluation after training raises the process's peak
    monkeypatch.setattr(bench, "_peak_rss_mib", lambda: 999.0 if seen.get("evaluated") else 100.0)
    res = bench.worker_reference(store, 16, 1, 0)
    val = read_validation_mask(open_store(store), 0.1)
    # same cells as ours: trained on the store's training split, scored on its held-out split
    assert seen["setup"] == [int((~val).sum()), int(val.sum())]
    assert seen["heldout_cells"] == int(val.sum()) and res["cells_trained"] == int((~val).sum())
    assert seen["train_kwargs"]["batch_size"] == 16 and seen["train_kwargs"]["max_epochs"] == 1
    assert seen["train_kwargs"]["train_size"] == 1.0  # no validation inside the reference's timed call
    # the harness's copies of every cell are gone while the reference trains: its peak RSS is its own
    assert seen["alive_during_train"] == [False, False]
    # the peak RSS the tables print is the training call's, read before the held-out evaluation
    assert res["peak_rss_train_mib"] == 100.0
    row = bench._training_peak({**res, "peak_rss_mib": 999.0})  # the driver: wait4's whole-worker peak
    assert row["peak_rss_mib"] == 100.0 and row["peak_rss_process_mib"] == 999.0


def test_ours_worker_counts_child_cpu_and_builds_kernels_before_its_timer(tmp_path, monkeypatch):
    """CPU time of the training call includes its child processes (the whole job's cost, as for the
    reference), the native kernels' one-off compile (a child process) happens before the timer, and the
    peak RSS is the training call's."""
    import subprocess

    import trainer.export
    import trainer.train
    from data.synthetic import write_synthetic_store
    from trainer import native

    store = str(tmp_path / "s.zarr")
    write_synthetic_store(store, n_cells=40, n_genes=20, n_regions=30, progress=False, overwrite=True)
    bench = _bench_train()
    order: list[str] = []
    monkeypatch.setattr(native, "_compiler", lambda: "cc")
    monkeypatch.setattr(native, "_build", lambda cc: order.append("build"))

    def fake_train(cfg):
        order.append("train")
        subprocess.run([sys.executable, "-c", BUSY_CHILD], check=True)
        return types.SimpleNamespace(model_dir=str(tmp_path / "model"), steps=3)

    monkeypatch.setattr(trainer.train, "train", fake_train)
    monkeypatch.setattr(trainer.export, "load_model", lambda path: (None, None))
    monkeypatch.setattr(bench, "_evaluate", lambda module, store: order.append("evaluate") or 1.0)
    monkeypatch.setattr(bench, "_peak_rss_mib", lambda: 999.0 if "evaluate" in order else 100.0)
    res = bench.worker_ours(store, 16, 1, str(tmp_path / "run"), 0, "none")
    assert order == ["build", "train", "evaluate"]
    assert res["peak_rss_train_mib"] == 100.0  # read before the held-out evaluation
    assert res["cpu_s"] >= 0.25  # the child's CPU is in the training call's (process_time alone: ~0.01)


def test_bench_common_cpu_s_counts_child_processes():
    """scripts/bench/infer.py's cells/CPU-s: a job's child processes are part of its CPU time."""
    import subprocess

    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    try:
        import bench_common
    finally:
        sys.path.remove(str(ROOT / "scripts" / "bench"))
    t0 = bench_common.cpu_s()
    subprocess.run([sys.executable, "-c", BUSY_CHILD], check=True)
    assert bench_common.cpu_s() - t0 >= 0.25


def test_step_floor_epoch_figures_count_each_seed_once(tmp_path):
    """step_floor.py --epochs-json reads a train.py JSON: a --check-repro repeat is not another seed."""
    import json

    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_step_floor", ROOT / "scripts" / "bench" / "step_floor.py")
        floor = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(floor)
    finally:
        sys.path.remove(str(ROOT / "scripts" / "bench"))
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"runs": {
        "reference_b128_s0": {"cells_per_cpu_s": 1000.0}, "ours_b128_s0": {"cells_per_cpu_s": 2000.0},
        "reference_b128_s1": {"cells_per_cpu_s": 1000.0}, "ours_b128_s1": {"cells_per_cpu_s": 3000.0},
        "reference_b128_s0_repeat": {"cells_per_cpu_s": 1000.0}, "ours_b128_s0_repeat": {"cells_per_cpu_s": 2000.0},
        "ours_b1024_s0": {"cells_per_cpu_s": 9999.0}}}))
    ep = floor.epoch_figures(str(path), 0.0)
    assert ep["runs_per_side"] == 2 and ep["ours_cells_per_cpu_s"] == 2500.0 and ep["speedup"] == 2.5
