"""The RNA library as the reference models it (a deterministic network) vs as a latent with a per-batch
LogNormal prior (``model.rna_library=lognormal``), on real cells: the BMMC starter (500 cells, 2 donors).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/library_prior.py --seeds 0,1,2 --out outputs/bench/library_prior.json

Per seed and mode, one run with the bmmc preset's settings (conf/experiment/bmmc.yaml: lr 1e-3, 64 cells per
batch, KL warm-up over 100 of 200 epochs, the default 10 % validation split; no early stopping, so both
modes train the same number of steps). Scores: the last validation's reconstruction loss and ELBO per cell
(the lognormal ELBO includes its library KL; the deterministic model's library is no latent, so compare
reconstruction first), the 15-NN cell-type accuracy of the joint latent over all cells, how well the model's
library (the posterior mean of log-library for lognormal, the network's value otherwise) follows the cells'
observed log RNA totals (Pearson r, and the mean absolute difference), and the training's CPU seconds.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from bmmc_runs import DATA, EPOCHS, ROOT, bmmc_config

MODES = ("deterministic", "lognormal")


def _store(work: Path, data: Path) -> Path:
    from data.build import build_store
    from data.config import BuildConfig, InputConfig

    out = work / "bmmc.zarr"
    if not (out / "zarr.json").exists():
        build_store(BuildConfig(out=str(out), label_key="cell_type", progress=False, inputs=[InputConfig(
            kind="h5ad_pair", rna=str(data / "bmmc_starter_rna.h5ad"), atac=str(data / "bmmc_starter_atac.h5ad"))]))
    return out


def one_run(store: Path, work: Path, mode: str, seed: int, epochs: int) -> dict:
    import numpy as np
    import torch

    from data.store import open_store
    from trainer import api
    from trainer.quality.metrics import knn_label_accuracy
    from trainer.train import train

    torch.set_num_threads(1)
    out = work / f"{mode}_seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # run.resume=none refuses a directory with an earlier run's checkpoints
    t = os.times()
    res = train(bmmc_config(store, out, epochs, **{"run.seed": seed, "model.rna_library": mode}))
    cpu = (os.times().user + os.times().system) - (t.user + t.system)
    recs = [json.loads(line) for line in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if "elbo_validation" in r][-1]
    model = api.load(res.model_dir, device="cpu")
    obs = open_store(store).read_obs()
    z = model.latent(str(store))
    labels = obs["cell_type"].astype(str).to_numpy()
    rna = obs["mask_rna"].to_numpy(bool) & (obs["lib_rna"].to_numpy() > 0)
    lib = model.library_size_factors(str(store))["expression"][rna]
    observed = np.log(obs["lib_rna"].to_numpy()[rna])
    return {"mode": mode, "seed": seed, "recon_validation": last["reconstruction_loss_validation"],
            "elbo_validation": last["elbo_validation"], "knn_label_acc": knn_label_accuracy(z, labels),
            "library_r": float(np.corrcoef(lib, observed)[0, 1]),
            "library_mad": float(np.abs(lib - observed).mean()), "cpu_s": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--work", default=str(ROOT / "outputs" / "bench" / "library_prior"))
    p.add_argument("--data", default=str(DATA), help="the BMMC starter's folder (bmmc_starter_{rna,atac}.h5ad)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "library_prior.json"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    store = _store(work, Path(args.data))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = [one_run(store, work, mode, s, args.epochs) for s in seeds for mode in MODES]
    keys = ("recon_validation", "elbo_validation", "knn_label_acc", "library_r", "library_mad", "cpu_s")
    print(f"\n{'rna_library':<14}" + "".join(f"{k:>22}" for k in keys))
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        print(f"{mode:<14}" + "".join(f"{_mean([r[k] for r in mine]):>22}" for k in keys))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "epochs": args.epochs,
                                          "wall_s": time.time() - t0}, indent=1))
    print(f"wrote {args.out}")


def _mean(vals) -> str:
    import numpy as np

    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"


if __name__ == "__main__":
    main()
