"""Query mapping on real cells: the BMMC starter's donor s1d1 is the atlas, donor s1d2 the query.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/query_map.py --seeds 0,1,2 --out outputs/bench/query_map.json

Per seed and atlas model (the default, encode_covariates=False, whose encoders never see the batch; and
encode_covariates=True, whose encoders do): our model trained on the s1d1 cells (the bmmc preset's settings:
lr 1e-3, 64 cells per batch, KL warm-up over 100 of 200 epochs; every cell trains, no validation, no early
stopping), then the s1d2 cells mapped as a new batch, 200 epochs with the same settings and weight_decay 0:
  ours             mva-train query.reference (the reference's freezing rules; dropout on)
  ours_no_dropout  the same with query.freeze_dropout=true (what the reference's query training runs: its
                   module stays in eval mode under Lightning 2.x)
  scvi             scvi-tools' prepare_query_mudata + load_query_data + train on the same exported weights
                   (imported back: every variant is scored by the same code, trainer.api)
  none             no query training: the s1d2 cells read by the atlas model as if they were s1d1
Metrics: 15-NN label transfer from the s1d1 to the s1d2 cells and donor mixing within cell types
(scib-style ASW, 1 = mixed) on atlas + query latents; the query cells' reconstruction loss per cell (RNA +
ATAC, on the cells the query trained on: how well the model now fits the new donor); the largest change of
an atlas cell's latent against the atlas model; the query training's CPU seconds. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from bmmc_runs import BATCH, DATA, EPOCHS, LR, ROOT, WARMUP, bmmc_config


def _stores(work: Path, data: Path) -> tuple[Path, Path]:
    """The two donors' h5ad pairs and their stores (the query built with the atlas model's features later)."""
    import anndata as ad

    from data.build import build_store
    from data.config import BuildConfig, InputConfig

    rna, atac = ad.read_h5ad(data / "bmmc_starter_rna.h5ad"), ad.read_h5ad(data / "bmmc_starter_atac.h5ad")
    inputs = {}
    for donor in ("s1d1", "s1d2"):
        d = work / donor
        d.mkdir(parents=True, exist_ok=True)
        sel = (rna.obs["batch"] == donor).to_numpy()
        rna[sel].copy().write_h5ad(d / "rna.h5ad")
        atac[sel].copy().write_h5ad(d / "atac.h5ad")
        inputs[donor] = InputConfig(kind="h5ad_pair", rna=str(d / "rna.h5ad"), atac=str(d / "atac.h5ad"))
    atlas = work / "atlas.zarr"
    if not (atlas / "zarr.json").exists():
        build_store(BuildConfig(out=str(atlas), inputs=[inputs["s1d1"]], label_key="cell_type", progress=False))
    return atlas, inputs["s1d2"]


def _config(store, out, epochs: int, **extra):
    """Every cell trains: no validation split, no validation."""
    return bmmc_config(store, out, epochs, **{"data.val_fraction": 0.0, "run.validate_every_epochs": 0, **extra})


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def one_seed(seed: int, work: Path, encode_covariates: bool, epochs: int, data: Path) -> dict:
    import mudata
    import numpy as np
    import scvi
    import torch

    from data.build import build_store
    from data.config import BuildConfig
    from trainer import api
    from trainer.quality.metrics import label_transfer_accuracy, mixing_asw
    from trainer.scvi_import import import_from_scvi
    from trainer.scvi_io import export_to_scvi, store_to_mudata
    from trainer.train import train

    torch.set_num_threads(1)
    atlas, query_input = _stores(work, data)
    w = work / f"{'enc' if encode_covariates else 'default'}_seed{seed}"
    shutil.rmtree(w, ignore_errors=True)  # run.resume=none refuses a directory holding an earlier run's checkpoints
    w.mkdir(parents=True)
    ref = train(_config(atlas, w / "atlas_run", epochs, **{"run.seed": seed, "model.encode_covariates": encode_covariates}))
    qstore = build_store(BuildConfig(out=str(w / "query.zarr"), inputs=[query_input], label_key="cell_type",
                                     features_from=ref.run_dir, progress=False))
    atlas_md, query_md = store_to_mudata(atlas), store_to_mudata(qstore)
    as_atlas = store_to_mudata(qstore)  # the "none" variant: the query cells under the atlas's batch name
    as_atlas.obs["batch"] = np.array(["s1d1"] * as_atlas.n_obs)
    labels = np.concatenate([atlas_md.obs["cell_type"].astype(str), query_md.obs["cell_type"].astype(str)])
    donors = np.array(["s1d1"] * atlas_md.n_obs + ["s1d2"] * query_md.n_obs)
    src, tgt = np.arange(atlas_md.n_obs), np.arange(atlas_md.n_obs, len(labels))
    z_atlas_ref = api.load(ref.model_dir, device="cpu").latent(atlas_md)

    def scores(model_dir, query, cpu_s) -> dict:
        m = api.load(model_dir, device="cpu")
        z_atlas, z_query = m.latent(atlas_md), m.latent(query)
        z = np.vstack([z_atlas, z_query])
        rec = m.reconstruction_error(query)
        return {"transfer_acc": label_transfer_accuracy(z, labels, src, tgt),
                "donor_mixing_asw": mixing_asw(z, donors, labels),
                "query_recon": rec["reconstruction_loss_expression"] + rec["reconstruction_loss_accessibility"],
                "atlas_latent_max_diff": float(np.abs(z_atlas - z_atlas_ref).max()), "query_cpu_s": cpu_s}

    out = {"seed": seed, "encode_covariates": encode_covariates, "n_atlas": int(atlas_md.n_obs),
           "n_query": int(query_md.n_obs)}
    for name, extra in (("ours", {}), ("ours_no_dropout", {"query.freeze_dropout": True})):
        t = _cpu()
        res = train(_config(qstore, w / name, epochs, **{"run.seed": seed, "query.reference": ref.run_dir,
                                                 "optim.weight_decay": 0.0, **extra}))
        out[name] = scores(res.model_dir, query_md, _cpu() - t)
    out["none"] = scores(ref.model_dir, as_atlas, 0.0)

    export_to_scvi(ref.model_dir, w / "scvi_ref")
    scvi.settings.seed = seed
    q = mudata.MuData({k: v.copy() for k, v in query_md.mod.items()})
    q.obs = query_md.obs.copy()
    scvi.model.MULTIVI.prepare_query_mudata(q, str(w / "scvi_ref"))
    t = _cpu()
    qm = scvi.model.MULTIVI.load_query_data(q, str(w / "scvi_ref"), accelerator="cpu")
    qm.train(max_epochs=epochs, lr=LR, batch_size=BATCH, n_epochs_kl_warmup=min(WARMUP, epochs), weight_decay=0.0,
             train_size=1.0, early_stopping=False, accelerator="cpu", devices=1, enable_progress_bar=False,
             datasplitter_kwargs={"drop_last": False})
    cpu = _cpu() - t
    qm.save(str(w / "scvi_query"))
    out["scvi"] = scores(import_from_scvi(w / "scvi_query", w / "scvi_query_imported"), query_md, cpu)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="of the atlas and of every query")
    p.add_argument("--work", default=str(ROOT / "outputs" / "bench" / "query_map"))
    p.add_argument("--data", default=str(DATA), help="the BMMC starter's folder (bmmc_starter_{rna,atac}.h5ad)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "query_map.json"))
    args = p.parse_args()
    work = Path(args.work)
    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = [one_seed(s, work, enc, args.epochs, Path(args.data)) for enc in (False, True) for s in seeds]
    print(f"\n{'atlas model':<26} {'variant':<16} {'transfer acc':>14} {'donor mixing':>14} {'query recon':>16} "
          f"{'atlas max diff':>15} {'query CPU s':>12}")
    for enc in (False, True):
        mine = [r for r in runs if r["encode_covariates"] == enc]
        for v in ("ours", "ours_no_dropout", "scvi", "none"):
            col = {k: [r[v][k] for r in mine] for k in mine[0][v]}
            print(f"{'encode_covariates=' + str(enc):<26} {v:<16} {_mean(col['transfer_acc']):>14} "
                  f"{_mean(col['donor_mixing_asw']):>14} {_mean(col['query_recon'], 1):>16} "
                  f"{max(col['atlas_latent_max_diff']):>15.2e} {_mean(col['query_cpu_s'], 1):>12}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "epochs": args.epochs, "lr": LR, "batch_size": BATCH,
                                          "wall_s": time.time() - t0}, indent=1))
    print(f"wrote {args.out}")


def _mean(vals, digits: int = 3) -> str:
    import numpy as np

    return f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}"


if __name__ == "__main__":
    main()
