"""``scripts/bench/gpu_step.py`` (the GPU cells/s benchmark of issue #4) runs, on the CPU at toy sizes,
and imports nothing but torch and our model code: it is meant for a bare GPU machine that has torch
and no zarr / omegaconf / hydra / anndata.

    .venv/bin/python -m pytest tests/test_gpu_step_script.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import runpy, sys
sys.argv = ["gpu_step.py", "--device", "cpu", "--sizes", "40x300", "--batch-size", "32", "--steps", "2",
            "--warmup", "1", "--out", sys.argv[1]]
sys.path.insert(0, "scripts/bench")
runpy.run_path("scripts/bench/gpu_step.py", run_name="__main__")
heavy = [m for m in ("zarr", "omegaconf", "hydra", "anndata", "dask", "scvi") if m in sys.modules]
assert not heavy, heavy
"""


def test_gpu_step_script_runs_on_torch_alone(tmp_path):
    out = tmp_path / "gpu_step.json"
    proc = subprocess.run([sys.executable, "-c", RUN, str(out)], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    timed = {r["mode"]: r for r in rows if "cells_per_s" in r}
    assert set(timed) == {"fp32", "amp_bf16"}
    assert all(r["finite"] and r["cells_per_s"] > 0 for r in timed.values())
    check = next(r for r in rows if r["mode"] == "all_bf16_check")
    assert check["loss_dtype"] == "torch.float32" and check["grads_finite"]
    assert max(check["rel_err_of_batch_sums"].values()) < 1e-2
