"""One harness run: for each (paired fraction, seed), train both sides on the same scenario and score
them with the same evaluator and metrics. Results are appended to a JSON file as they come, so a
long sweep that is interrupted keeps what it finished (and a rerun skips it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data.split import cell_hash, is_validation
from trainer.quality import metrics as M
from trainer.quality.data import PairedData
from trainer.quality.diagnose import diagnostics
from trainer.quality.evaluate import Outputs, evaluate
from trainer.quality.scenario import Scenario, make_scenario, training_view
from trainer.quality.settings import TrainSettings

SIDES = ("ours", "reference")


def score(out: Outputs, data: PairedData, sc: Scenario) -> dict[str, float]:
    """Every metric of one trained model on one scenario (NaN where a metric does not apply)."""
    z, lab = out.z_joint, data.labels
    r: dict[str, float] = {f"heldout_{k}": v for k, v in out.heldout.items()}
    if lab is not None:
        r["knn_label_accuracy"] = M.knn_label_accuracy(z, lab)
        r["transfer_to_rna_only"] = M.label_transfer_accuracy(z, lab, sc.paired, sc.rna_only)
        r["transfer_to_atac_only"] = M.label_transfer_accuracy(z, lab, sc.paired, sc.atac_only)
        r["label_asw"] = M.label_silhouette(z, lab)
    r["batch_asw"] = M.mixing_asw(z, data.batch, lab) if len(np.unique(data.batch)) > 1 else M.NAN
    r["modality_asw"] = M.mixing_asw(z, sc.modality, lab)
    if len(sc.atac_only):
        r["rna_pearson_per_gene"], r["rna_pearson_per_cell"] = M.imputation_pearson(out.imputed_rna,
                                                                                 data.rna[sc.atac_only])
    if len(sc.rna_only):
        r["atac_auroc"] = M.accessibility_auroc(out.imputed_atac, data.atac[sc.rna_only])
    if len(sc.rna_only) + len(sc.atac_only) > 1:
        r["foscttm"] = M.foscttm(out.z_rna_version, out.z_atac_version)
        r["relative_match_distance"] = M.relative_match_distance(out.z_rna_version, out.z_atac_version)
    return r


def pin_threads() -> None:
    """One torch thread (intra- and inter-op) in this process, before each side trains: the shared box's
    other jobs and run-to-run reproducibility both need it; scvi/Lightning must not have changed it."""
    import torch

    torch.set_num_threads(1)
    if torch.get_num_threads() != 1:
        raise RuntimeError(f"torch uses {torch.get_num_threads()} threads, the harness needs 1")


def run_one(data: PairedData, fraction: float, seed: int, s: TrainSettings, work: Path) -> dict:
    """Train ours and the reference on one scenario; return both sides' metrics and run facts."""
    from trainer.quality.ours import train_ours
    from trainer.quality.reference import train_reference

    sc = make_scenario(data.n_cells, fraction, seed)
    val = is_validation(cell_hash(data.cell_ids), s.val_fraction)
    cats = sorted(set(data.batch.tolist()))  # the store's rule: sorted categories
    codes = np.searchsorted(cats, data.batch).astype(np.int64)
    view_rna, view_atac = training_view(sc, data.rna, data.atac)
    pin_threads()
    init = None
    if s.ours_init == "reference":  # ablation: ours starts where the reference starts
        from trainer.quality.reference import reference_initial_state

        init = reference_initial_state(data, sc, s, np.flatnonzero(~val), cats)
    ours = train_ours(data, sc, s, work, init_state=init)
    pin_threads()
    ref = train_reference(data, sc, s, np.flatnonzero(~val), cats)
    res = {"dataset": data.name, "fraction": fraction, "seed": seed, "settings": asdict(s),
           "n_cells": data.n_cells, "n_validation": int(val.sum()), "n_paired": len(sc.paired),
           "n_rna_only": len(sc.rna_only), "n_atac_only": len(sc.atac_only),
           "reference_latent_max_abs_diff": ref.latent_max_abs_diff}
    for side, run in (("ours", ours), ("reference", ref)):
        out = evaluate(run.module, view_rna, view_atac, data.rna, data.atac, sc.mask, codes, sc.rna_only,
                       sc.atac_only, val)
        diag = diagnostics(run.module, view_rna, view_atac, data.rna, data.atac, sc.mask, codes, ~val, sc.paired,
                           np.concatenate([sc.rna_only, sc.atac_only]))
        res[side] = {**score(out, data, sc), **diag,
                     "finite_loss": bool(run.finite and np.isfinite(out.heldout["elbo"])),
                     "train_seconds": run.train_seconds}
    res["ours"]["skipped_steps"] = ours.skipped_steps
    shutil.rmtree(work, ignore_errors=True)  # the store and checkpoints are rebuilt on demand
    return res


def run_sweep(data: PairedData, fractions: list[float], seeds: list[int], s: TrainSettings, out_dir: Path,
              log=print) -> list[dict]:
    """All (fraction, seed) runs, appended to ``out_dir/quality.json`` as they finish."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "quality.json"
    stored = json.loads(path.read_text()) if path.is_file() else []
    # runs of this data set with these settings are reused; others stay in the file untouched
    done = [r for r in stored if r["dataset"] == data.name and stored_settings(r) == asdict_seedless(s, r)]
    for f in fractions:
        for seed in seeds:
            if any(r["fraction"] == f and r["seed"] == seed for r in done):
                continue
            st = TrainSettings(**{**asdict(s), "seed": seed})
            r = run_one(data, f, seed, st, out_dir / "work")
            done.append(r)
            stored.append(r)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(stored, indent=1))
            tmp.replace(path)  # atomic: an interrupted write never truncates finished runs
            log(f"[quality] {data.name} fraction {f} seed {seed}: " + "  ".join(
                f"{side} elbo {r[side]['heldout_elbo']:.1f} finite={r[side]['finite_loss']}" for side in SIDES))
    return [r for r in done if r["fraction"] in fractions and r["seed"] in seeds]


def asdict_seedless(s: TrainSettings, r: dict) -> dict:
    """The settings a stored run must have had to be reused (its own seed, our other settings)."""
    return {**asdict(s), "seed": r["seed"]}


def stored_settings(r: dict) -> dict:
    """A stored run's settings, with fields added after it was written at the value it ran with."""
    return {"adversarial": True, "dropout_rate": 0.1, "ours_init": "own", "ours_noise": "keyed", "ref_init": "own",
            **r["settings"]}
