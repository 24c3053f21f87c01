"""``scripts/bench/query_map.py`` (query mapping on the real BMMC starter cells, ours vs scvi-tools) runs at
3 epochs: every variant scored, the atlas cells' latents kept by ours, moved by scvi-tools' surgery when a
single-batch atlas's encoders read the batch (README "Query mapping").

    .venv/bin/python -m pytest tests/test_query_map_script.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/neurips2021_bmmc_multiome_starter")


@pytest.mark.slow
def test_query_map_script_at_three_epochs(tmp_path):
    out = tmp_path / "qm.json"
    proc = subprocess.run([sys.executable, "scripts/bench/query_map.py", "--seeds", "0", "--epochs", "3",
                           "--work", str(tmp_path / "work"), "--out", str(out), "--data", str(DATA)],
                          cwd=ROOT, capture_output=True, text=True, check=False, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["encode_covariates"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {False, True}
    for r in runs.values():
        assert (r["n_atlas"], r["n_query"]) == (221, 279)
        for v in ("ours", "ours_no_dropout", "scvi", "none"):
            assert 0 <= r[v]["transfer_acc"] <= 1 and r[v]["query_recon"] > 0, (v, r[v])
        assert r["ours"]["atlas_latent_max_diff"] <= 1e-5
    assert runs[False]["scvi"]["atlas_latent_max_diff"] <= 1e-5  # encoders without the batch: nothing moves
    assert runs[True]["scvi"]["atlas_latent_max_diff"] > 1e-3  # its random column for the atlas's batch
    assert "encode_covariates=True" in proc.stdout and "transfer acc" in proc.stdout
