"""End to end: scripts/bench/quality.py on the real PBMC subset (1 fraction, 1 seed, 2 epochs), both
sides trained for real (our store + trainer, scvi-tools MULTIVI), then the report's flag logic."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PBMC = Path("/work/shared/data/pbmc_10x_multiome_muon_testsubset")
if not PBMC.is_dir():
    PBMC = ROOT.parent / "shared/data/pbmc_10x_multiome_muon_testsubset"


def _cli():
    spec = importlib.util.spec_from_file_location("quality_cli", ROOT / "scripts/bench/quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.reference
def test_quality_cli_end_to_end_pbmc(tmp_path):
    pytest.importorskip("scvi")
    out = tmp_path / "q"
    rc = _cli().main(["--rna", str(PBMC / "pbmc_muon_test_rna.h5ad"), "--atac", str(PBMC / "pbmc_muon_test_atac.h5ad"),
                      "--fractions", "0.5", "--seeds", "0", "--epochs", "2", "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "quality.json").read_text())
    assert len(runs) == 1
    r = runs[0]
    assert (r["n_paired"], r["n_rna_only"] + r["n_atac_only"]) == (500, 500)
    assert r["reference_latent_max_abs_diff"] < 1e-4  # the reference's weights evaluate as in scvi-tools
    for side in ("ours", "reference"):
        m = r[side]
        assert m["finite_loss"]
        assert np.isfinite(m["heldout_elbo"]) and m["heldout_elbo"] > 0
        assert 0.0 <= m["atac_auroc"] <= 1.0 and 0.0 <= m["foscttm"] <= 1.0
        assert -1.0 <= m["rna_pearson_per_cell"] <= 1.0
        assert 0.0 <= m["modality_asw"] <= 1.0
        assert "knn_label_accuracy" not in m  # no labels in this data set
        assert np.isnan(m["batch_asw"])  # one batch: nothing to mix
    md = (out / "quality.md").read_text()
    assert "| imputed ATAC AUROC ↑ | 0.5 |" in md and "No cell-type labels" in md
    assert (out / "quality.png").stat().st_size > 1000
    # a rerun with the same settings reuses the finished run instead of training again; a stored run
    # with other settings is kept in the file but not reported
    other = {**r, "settings": {**r["settings"], "epochs": 999}}
    (out / "quality.json").write_text(json.dumps([r, other]))
    rc = _cli().main(["--rna", str(PBMC / "pbmc_muon_test_rna.h5ad"), "--atac", str(PBMC / "pbmc_muon_test_atac.h5ad"),
                      "--fractions", "0.5", "--seeds", "0", "--epochs", "2", "--out", str(out)])
    assert rc == 0 and json.loads((out / "quality.json").read_text()) == [r, other]
    assert "1 runs per side" in (out / "quality.md").read_text()


def test_cli_rejects_bad_arguments():
    cli = _cli()
    with pytest.raises(SystemExit):
        cli.parse(["--fractions", "0.5"])  # neither --rna/--atac nor --synthetic
    with pytest.raises(SystemExit):
        cli.parse(["--synthetic", "--fractions", "1.5"])


def test_worse_flag_needs_every_seed_and_a_gap_beyond_the_spread():
    from trainer.quality.report import summarize

    def runs(ours, ref):
        return [{"fraction": 0.5, "seed": i, "ours": {"atac_auroc": o}, "reference": {"atac_auroc": r}}
                for i, (o, r) in enumerate(zip(ours, ref))]

    flag = lambda rs: summarize(rs)[0]["worse_beyond_noise"]
    assert flag(runs([0.70, 0.71, 0.69], [0.80, 0.81, 0.79]))  # clearly worse in every seed
    assert not flag(runs([0.70, 0.82, 0.69], [0.80, 0.81, 0.79]))  # better in one seed
    assert not flag(runs([0.60, 0.80, 0.70], [0.72, 0.83, 0.71]))  # worse each time, but within the spread
    assert not flag(runs([0.9, 0.9, 0.9], [0.8, 0.8, 0.8]))  # better
    assert not flag(runs([0.7], [0.8]))  # one seed: no spread to judge against


def test_report_from_several_sweeps_pairs_seeds(tmp_path):
    """--report-from: one table over runs stored by two sweeps; only matching settings count, and
    the paired column is ours - reference per seed (mean ± s.e., worse in k of n)."""

    def run(seed, ours, ref, epochs=300, version=2):
        return {"dataset": "synthetic", "fraction": 0.1, "seed": seed,
                "settings": {"epochs": epochs, "harness_version": version},
                "ours": {"foscttm": ours, "diag_qzv_rna": ours, "finite_loss": True},
                "reference": {"foscttm": ref, "diag_qzv_rna": ref, "finite_loss": True}}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([run(0, 0.20, 0.10), run(1, 0.30, 0.20), run(2, 0.9, 0.1, epochs=100)]))
    b.write_text(json.dumps([run(2, 0.10, 0.20), run(3, 0.9, 0.1, version=1)]))
    rc = _cli().main(["--report-from", str(a), str(b), "--epochs", "300", "--fractions", "0.1",
                      "--seeds", "0,1,2,3", "--out", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "quality.md").read_text()
    assert rc == 0 and "3 runs per side (seeds [0, 1, 2])" in md  # 100-epoch and version-1 runs left out
    # per-seed differences +0.1, +0.1, -0.1
    d = np.array([0.1, 0.1, -0.1])
    want = f"+{d.mean():.3f} ± {d.std(ddof=1) / np.sqrt(3):.3f} (2/3)"
    assert f"| FOSCTTM RNA vs ATAC version ↓ | 0.1 | 0.200 ± 0.082 | 0.167 ± 0.047 | {want} |  |" in md
    # diagnostics: a second table, same paired numbers, counted as "ours higher in"
    assert f"| RNA encoder posterior variance (paired cells) | 0.1 | 0.200 ± 0.082 | 0.167 ± 0.047 | {want} |" in md
    assert _cli().main(["--report-from", str(a), "--epochs", "7", "--out", str(tmp_path / "none")]) == 2
