"""The real-cell comparison scripts on the BMMC starter (``scripts/bench/bmmc_runs.py`` and its users) run at
3 epochs:

* ``query_map.py`` (query mapping, ours vs scvi-tools): every variant scored, the atlas cells' latents kept by
  ours, moved by scvi-tools' surgery when a single-batch atlas's encoders read the batch (README "Query
  mapping");
* ``library_prior.py`` (the deterministic vs the lognormal RNA library): both modes scored on one store.

    .venv/bin/python -m pytest tests/test_bmmc_scripts.py -q
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


def _run(script: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, f"scripts/bench/{script}", "--seeds", "0", "--epochs", "3",
                           "--work", str(tmp_path / "work"), "--out", str(out), "--data", str(DATA)],
                          cwd=ROOT, capture_output=True, text=True, check=False, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_query_map_script_at_three_epochs(tmp_path):
    proc, result = _run("query_map.py", tmp_path)
    runs = {r["encode_covariates"]: r for r in result["runs"]}
    assert set(runs) == {False, True}
    for r in runs.values():
        assert (r["n_atlas"], r["n_query"]) == (221, 279)
        for v in ("ours", "ours_no_dropout", "scvi", "none"):
            assert 0 <= r[v]["transfer_acc"] <= 1 and r[v]["query_recon"] > 0, (v, r[v])
        assert r["ours"]["atlas_latent_max_diff"] <= 1e-5
    assert runs[False]["scvi"]["atlas_latent_max_diff"] <= 1e-5  # encoders without the batch: nothing moves
    assert runs[True]["scvi"]["atlas_latent_max_diff"] > 1e-3  # its random column for the atlas's batch
    assert "encode_covariates=True" in proc.stdout and "transfer acc" in proc.stdout


@pytest.mark.slow
def test_library_prior_script_at_three_epochs(tmp_path):
    proc, result = _run("library_prior.py", tmp_path)
    runs = {r["mode"]: r for r in result["runs"]}
    assert set(runs) == {"deterministic", "lognormal"}
    for r in runs.values():
        assert r["recon_validation"] > 0 and r["elbo_validation"] >= r["recon_validation"] - 1e-6, r
        assert 0 <= r["knn_label_acc"] <= 1 and -1 <= r["library_r"] <= 1 and r["library_mad"] > 0, r
    assert runs["deterministic"]["recon_validation"] != runs["lognormal"]["recon_validation"]
    assert "lognormal" in proc.stdout and "library_r" in proc.stdout
