"""Quality harness: our MultiVI vs scvi-tools MULTIVI on paired data with one modality hidden for part
of the cells (the MultiVI paper's protocol), several paired fractions and seeds, one command.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/quality.py \
        --rna ../shared/data/neurips2021_bmmc_multiome_starter/bmmc_starter_rna.h5ad \
        --atac ../shared/data/neurips2021_bmmc_multiome_starter/bmmc_starter_atac.h5ad \
        --batch-key batch --label-key cell_type --out outputs/quality/bmmc
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/quality.py --synthetic --out outputs/quality/synthetic

Writes <out>/quality.json (every run, both sides), <out>/quality.md (table) and <out>/quality.png
(figure); exits 1 when any run of either side had a non-finite loss. Protocol: docs/quality.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# one thread everywhere, forced (not a default): a caller's OMP_NUM_THREADS=4 would make runs slower on a
# shared box and change float reduction order; spawned children inherit the environment
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _floats(text: str) -> list[float]:
    vals = [float(x) for x in text.split(",") if x.strip()]
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1], got {text!r}")
    return vals


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rna", help="RNA .h5ad of paired cells (raw counts in X)")
    ap.add_argument("--atac", help="ATAC .h5ad of the same cells")
    ap.add_argument("--batch-key", default=None, help="obs column with the batch (default: one batch)")
    ap.add_argument("--label-key", default=None, help="obs column with cell types (label metrics need it)")
    ap.add_argument("--synthetic", action="store_true", help="use a fully paired mva-synth atlas instead")
    ap.add_argument("--synthetic-cells", type=int, default=1000)
    ap.add_argument("--fractions", type=_floats, default=[1.0, 0.5, 0.25, 0.1])
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-warmup", type=int, default=None, help="KL warm-up epochs (default: epochs // 2)")
    ap.add_argument("--no-adversarial", action="store_true",
                    help="ablation: no adversarial batch classifier on either side")
    ap.add_argument("--dropout-rate", type=float, default=0.1,
                    help="the z-encoders' dropout on both sides (default: the reference's 0.1; 0: ablation)")
    ap.add_argument("--ours-init", choices=["own", "reference"], default="own",
                    help="ablation: 'reference' starts OUR side from the reference's initial weights (same seed)")
    ap.add_argument("--ours-noise", choices=["keyed", "global"], default="keyed",
                    help="ablation: 'global' draws OUR reparameterisation noise from the global generator")
    ap.add_argument("--ref-init", choices=["own", "ours"], default="own",
                    help="ablation: 'ours' starts the REFERENCE from our trainer's initial weights (same seed)")
    ap.add_argument("--out", default="outputs/quality/run")
    ap.add_argument("--title", default=None)
    ap.add_argument("--report-from", nargs="+", default=None, metavar="JSON",
                    help="no training: tables + figure in --out from finished runs in these quality.json files "
                         "(those with --epochs, --fractions, --seeds and the current harness version)")
    a = ap.parse_args(argv)
    if not a.synthetic and not (a.rna and a.atac) and not a.report_from:
        ap.error("give --rna and --atac (paired .h5ad files), or --synthetic")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    import torch

    torch.set_num_threads(1)
    from trainer.quality.data import read_pair, synthetic_pair
    from trainer.quality.harness import run_sweep
    from trainer.quality.report import figure, markdown
    from trainer.quality.settings import TrainSettings

    out = Path(a.out)
    if a.report_from:
        return _report_only(a, out)
    data = (synthetic_pair(out / "data", n_cells=a.synthetic_cells) if a.synthetic
            else read_pair(a.rna, a.atac, a.batch_key, a.label_key))
    s = TrainSettings(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, adversarial=not a.no_adversarial,
                      dropout_rate=a.dropout_rate, ours_init=a.ours_init, ours_noise=a.ours_noise,
                      ref_init=a.ref_init, n_epochs_kl_warmup=a.kl_warmup if a.kl_warmup is not None else max(1, a.epochs // 2))
    t0 = time.perf_counter()
    runs = run_sweep(data, a.fractions, a.seeds, s, out, log=lambda m: print(m, flush=True))
    title = a.title or f"{data.name} ({data.n_cells} cells, {len(data.gene_names)} genes, " \
                       f"{len(data.region_names)} peaks; {a.epochs} epochs)"
    md = markdown(runs, title)
    if data.labels is None:
        md += "\nNo cell-type labels: label accuracy, label transfer and label silhouette are skipped; " \
              "mixing scores use all cells as one group.\n"
    (out / "quality.md").write_text(md)
    figure(runs, out / "quality.png", data.name)
    load = os.getloadavg()
    print(md)
    print(f"[quality] {len(runs)} runs per side in {time.perf_counter() - t0:.0f} s (load average "
          f"{load[0]:.1f}); wrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}")
    bad = [(r["fraction"], r["seed"], side) for r in runs for side in ("ours", "reference")
           if not r[side]["finite_loss"]]
    if bad:
        print(f"[quality] NON-FINITE LOSS in runs (fraction, seed, side): {bad}", file=sys.stderr)
        return 1
    return 0


def _report_only(a: argparse.Namespace, out: Path) -> int:
    """--report-from: one table and figure over runs stored by several sweeps (e.g. extra seeds)."""
    from trainer.quality.report import figure, markdown, stored_runs
    from trainer.quality.settings import TrainSettings

    runs = stored_runs(a.report_from, a.epochs, a.fractions, a.seeds, TrainSettings().harness_version,
                       adversarial=not a.no_adversarial, dropout_rate=a.dropout_rate, ours_init=a.ours_init,
                       ours_noise=a.ours_noise, ref_init=a.ref_init)
    if not runs:
        print(f"[quality] no stored run in {a.report_from} matches --epochs {a.epochs}, --fractions, --seeds",
              file=sys.stderr)
        return 2
    name = runs[0]["dataset"]
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(runs, a.title or f"{name} ({a.epochs} epochs)")
    (out / "quality.md").write_text(md)
    figure(runs, out / "quality.png", name)
    print(md)
    return 1 if any(not r[s]["finite_loss"] for r in runs for s in ("ours", "reference")) else 0


if __name__ == "__main__":
    sys.exit(main())
