"""Runs -> Markdown table (mean +- sd over seeds, ours vs reference per metric and fraction) and a
figure (metric vs paired fraction, error bars = sd over seeds).

"Worse beyond noise" (the flag in the table): ours is worse than the reference in EVERY seed (same
split and seed on both sides, so seeds pair up) AND the mean gap exceeds the larger of the two
seed standard deviations (needs >= 2 seeds). Both conditions, so one unlucky seed or a gap inside the spread is not
reported as a regression.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# metric -> (label, higher is better)
METRICS = {
    "heldout_elbo": ("held-out -ELBO / cell", False),
    "heldout_recon_rna": ("held-out RNA recon. NLL", False),
    "heldout_recon_atac": ("held-out ATAC recon. NLL", False),
    "knn_label_accuracy": ("kNN label accuracy", True),
    "transfer_to_rna_only": ("label transfer paired -> RNA-only", True),
    "transfer_to_atac_only": ("label transfer paired -> ATAC-only", True),
    "label_asw": ("label silhouette (0-1)", True),
    "batch_asw": ("batch mixing ASW (0-1)", True),
    "modality_asw": ("modality mixing ASW (0-1)", True),
    "rna_pearson_per_gene": ("imputed RNA Pearson, per gene", True),
    "rna_pearson_per_cell": ("imputed RNA Pearson, per cell", True),
    "atac_auroc": ("imputed ATAC AUROC", True),
    "foscttm": ("FOSCTTM RNA vs ATAC version", False),
    "relative_match_distance": ("RNA-ATAC version distance (rel.)", False),
}


# end-of-training diagnostics (trainer/quality/diagnose.py): explain gaps, are not flagged
DIAGNOSTICS = {
    "diag_train_loss": ("training loss / cell (KL weight 1, posterior mean)", False),
    "diag_train_recon_rna": ("training RNA recon. NLL", False),
    "diag_train_recon_atac": ("training ATAC recon. NLL", False),
    "diag_train_kl": ("training KL / cell", False),
    "diag_penalty_paired": ("Jeffreys penalty, paired training cells", False),
    "diag_penalty_unpaired": ("Jeffreys RNA vs ATAC posterior, unpaired training cells", False),
    "diag_qzv_rna": ("RNA encoder posterior variance (paired cells)", False),
    "diag_qzv_atac": ("ATAC encoder posterior variance (paired cells)", False),
    "diag_lib_rna": ("learned RNA log-library", False),
}


def stored_runs(paths: list[str | Path], epochs: int, fractions: list[float], seeds: list[int],
                harness_version: int, adversarial: bool = True, dropout_rate: float = 0.1,
                ours_init: str = "own", ours_noise: str = "keyed", ref_init: str = "own") -> list[dict]:
    """Finished runs from several ``quality.json`` files (sweeps split over processes / out dirs):
    those with these epochs, fractions, seeds and harness version; one run per (data set, fraction,
    seed), the last one stored wins."""
    import json

    keep: dict[tuple, dict] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text()):
            st = r["settings"]
            if (st["epochs"] == epochs and st.get("harness_version") == harness_version
                    and st.get("adversarial", True) == adversarial and st.get("dropout_rate", 0.1) == dropout_rate
                    and st.get("ours_init", "own") == ours_init and st.get("ours_noise", "keyed") == ours_noise
                    and st.get("ref_init", "own") == ref_init
                    and r["fraction"] in fractions and r["seed"] in seeds):
                keep[(r["dataset"], r["fraction"], r["seed"])] = r
    return list(keep.values())


def _values(runs: list[dict], side: str, metric: str, fraction: float) -> np.ndarray:
    rs = sorted((r for r in runs if r["fraction"] == fraction), key=lambda r: r["seed"])
    return np.array([r[side].get(metric, np.nan) for r in rs], dtype=float)


def summarize(runs: list[dict], metrics: dict[str, tuple[str, bool]] = METRICS) -> list[dict]:
    """One row per (metric, fraction) that has a finite value on some side."""
    rows = []
    for metric, (label, higher) in metrics.items():
        for f in sorted({r["fraction"] for r in runs}, reverse=True):
            o, ref = _values(runs, "ours", metric, f), _values(runs, "reference", metric, f)
            if not (np.isfinite(o).any() or np.isfinite(ref).any()):
                continue
            sign = 1.0 if higher else -1.0
            gap = sign * (o - ref)  # > 0: ours better
            worse = bool(len(gap) >= 2 and np.all(gap < 0) and -np.mean(gap) > max(np.std(o), np.std(ref)))
            # the paired view: seeds share split and seed, so ours - ref per seed removes the scenario's
            # own variance (the sd columns are dominated by it) and shows a small systematic gap
            d = (o - ref)[np.isfinite(o - ref)]
            rows.append({"metric": metric, "label": label, "higher_is_better": higher, "fraction": f,
                         "ours_mean": float(np.nanmean(o)), "ours_sd": float(np.nanstd(o)),
                         "ref_mean": float(np.nanmean(ref)), "ref_sd": float(np.nanstd(ref)),
                         "n_seeds": len(o), "worse_beyond_noise": worse,
                         "diff_mean": float(d.mean()) if len(d) else np.nan,
                         "diff_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) >= 2 else np.nan,
                         "n_worse": int(np.sum(gap < 0)), "n_paired": len(d)})
    return rows


def _fmt(m: float, s: float, signed: bool = False) -> str:
    if not np.isfinite(m):
        return "n/a"
    digits = 1 if abs(m) >= 100 or (signed and abs(m) >= 1) else 3
    sign = "+" if signed else ""
    return f"{m:{sign}.{digits}f} ± {s:.{digits}f}" if np.isfinite(s) else f"{m:{sign}.{digits}f}"


def markdown(runs: list[dict], title: str) -> str:
    rows = summarize(runs)
    n_bad = {side: sum(not r[side]["finite_loss"] for r in runs) for side in ("ours", "reference")}
    seeds = sorted({r["seed"] for r in runs})
    intro = (f"{len(runs)} runs per side (seeds {seeds}); mean ± sd over seeds. Runs with a non-finite loss: "
             f"ours {n_bad['ours']}, reference {n_bad['reference']}. `worse` = ours worse than the reference "
             "in every seed by more than the seed spread. Paired: ours - reference per seed, mean ± "
             "standard error, and in how many seeds ours was worse.")
    lines = [f"### {title}", "", intro, "",
             "| metric | paired fraction | ours | reference | paired: ours - ref (worse in) | |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        flag = "**worse**" if r["worse_beyond_noise"] else ""
        paired = (f"{_fmt(r['diff_mean'], r['diff_se'], signed=True)} ({r['n_worse']}/{r['n_paired']})"
                  if r["n_paired"] else "n/a")
        lines.append(f"| {r['label']} {arrow} | {r['fraction']:g} | {_fmt(r['ours_mean'], r['ours_sd'])} | "
                     f"{_fmt(r['ref_mean'], r['ref_sd'])} | {paired} | {flag} |")
    diag = summarize(runs, DIAGNOSTICS)
    if diag:
        note = ("End-of-training diagnostics (`trainer/quality/diagnose.py`; they explain gaps and are not "
                "compared): paired = ours - reference per seed, mean ± s.e., and in how many seeds ours is higher.")
        lines += ["", note, "", "| diagnostic | paired fraction | ours | reference | paired: ours - ref (ours higher in) |",
                  "|---|---|---|---|---|"]
        for r in diag:
            higher = r["n_worse"] if not r["higher_is_better"] else r["n_paired"] - r["n_worse"]
            lines.append(f"| {r['label']} | {r['fraction']:g} | {_fmt(r['ours_mean'], r['ours_sd'])} | "
                         f"{_fmt(r['ref_mean'], r['ref_sd'])} | "
                         f"{_fmt(r['diff_mean'], r['diff_se'], signed=True)} ({higher}/{r['n_paired']}) |")
    return "\n".join(lines) + "\n"


def figure(runs: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(runs)
    metrics = [m for m in METRICS if any(r["metric"] == m for r in rows)]
    ncol = 4
    nrow = -(-len(metrics) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
    for ax, m in zip(axes.ravel(), metrics):
        for side, key, color, shift in (("ours", "ours", "tab:blue", 0.96), ("reference", "ref", "tab:orange", 1.04)):
            rs = [r for r in rows if r["metric"] == m]
            x = [r["fraction"] * shift for r in rs]  # side by side, not on top of each other
            ax.errorbar(x, [r[f"{key}_mean"] for r in rs], yerr=[r[f"{key}_sd"] for r in rs], marker="o",
                        ms=3, capsize=2, label=side, color=color)
        ax.set_title(METRICS[m][0], fontsize=8)
        if min(r["fraction"] for r in runs) > 0:
            ax.set_xscale("log")
        ax.set_xticks(sorted({r["fraction"] for r in runs}))
        ax.set_xticklabels([f"{f:g}" for f in sorted({r["fraction"] for r in runs})], fontsize=7)
        fr = [r["fraction"] for r in runs]
        ax.set_xlim(min(fr) * 0.8, max(fr) * 1.25)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.tick_params(labelsize=7)
        ax.set_xlabel("paired fraction", fontsize=7)
    for ax in axes.ravel()[len(metrics):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{title}: metric vs paired fraction (mean ± sd over seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path
