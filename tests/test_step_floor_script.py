"""``scripts/bench/step_floor.py`` (per-step framework overhead vs arithmetic, issue #4) runs at toy sizes:
every configuration dispatches the same ops, the tiny model is the cheapest, and the whole-epoch
ceiling is computed from a ``train.py`` JSON.

    .venv/bin/python -m pytest tests/test_step_floor_script.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_step_floor_script_at_toy_sizes(tmp_path):
    epochs = tmp_path / "train.json"
    # train.py's layout: per-run cells/CPU-s under "runs", keyed side_b<batch>_s<seed>
    epochs.write_text(json.dumps({"runs": {"reference_b128_s0": {"cells_per_cpu_s": 1000.0},
                                           "ours_b128_s0": {"cells_per_cpu_s": 2000.0},
                                           "ours_b1024_s0": {"cells_per_cpu_s": 9999.0}}}))
    out = tmp_path / "floor.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench/step_floor.py", "--genes", "60", "--regions", "300", "--batch-size", "32",
         "--steps", "4", "--warmup", "1", "--epochs-json", str(epochs), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert len({r["ops_per_step"] for r in rows.values()}) == 1  # same ops, so the tiny model isolates overhead
    assert rows["tiny model, batch 8"]["params"] < rows["benchmark"]["params"]
    assert res["overhead_ms"] == rows["tiny model, batch 8"]["ms_per_step"] > 0
    assert sum(res["by_kind_ms"].values()) > 0 and res["by_kind_ms"]["gemm"] > 0
    ep = res["epochs"]
    assert ep["speedup"] == pytest.approx(2.0) and ep["ms_per_batch_for_3x"] == pytest.approx(128.0 / 3)
    ours_ms = 128.0 / 2000 * 1e3
    assert ep["ceiling_without_overhead"] == pytest.approx(128.0 / (ours_ms - res["overhead_ms"]))
