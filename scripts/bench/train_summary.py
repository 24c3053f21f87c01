"""The seed statistics of scripts/bench/train.py: each side's mean, s.e. and t interval over seeds, the paired
held-out ELBO difference, and the 1 % decision drawn from it.
"""

from __future__ import annotations

import math

SIDES = ("reference", "ours")


def _stats(xs: list[float]) -> dict:
    """mean, sd (n-1), standard error and a two-sided t 95 % half-width of ``xs``."""
    from scipy.stats import t

    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    se = sd / math.sqrt(n) if n > 1 else float("nan")
    half = float(t.ppf(0.975, n - 1)) * se if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "se": se, "ci95_half": half, "min": min(xs), "max": max(xs)}


def decide(rel_mean: float, rel_half: float, tol: float = 0.01) -> str:
    """The 1 % target from the 95 % interval of the relative paired difference (ours - ref) / |ref|.

    Lower ELBO (a loss per cell) is better. ``within``: the whole interval inside +-tol; ``not worse``:
    its upper end below +tol (ours may be better by more than 1 %); ``worse``: its lower end above +tol;
    ``undecided``: the interval straddles +tol (too few seeds for the noise)."""
    lo, hi = rel_mean - rel_half, rel_mean + rel_half
    if math.isnan(rel_half):
        return "undecided (one seed)"
    if -tol < lo and hi < tol:
        return "within 1 %"
    if hi < tol:
        return "not worse by 1 % (ours better by more than 1 %)" if hi < -tol else "not worse by 1 %"
    if lo > tol:
        return "worse by more than 1 %"
    return "undecided"


def summarise(runs: dict, bs: int, seeds: list[int]) -> dict:
    """Per-seed ELBOs of one batch size -> each side's statistics and the paired difference."""
    per = {s: (runs[f"reference_b{bs}_s{s}"], runs[f"ours_b{bs}_s{s}"]) for s in seeds}
    out = {"seeds": seeds}
    for i, side in enumerate(SIDES):
        rs = [per[s][i] for s in seeds]
        out[side] = {"heldout_elbo": _stats([r["heldout_elbo"] for r in rs]),
                     "cells_per_cpu_s": _stats([r["cells_per_cpu_s"] for r in rs]),
                     "peak_rss_mib": _stats([r["peak_rss_mib"] for r in rs])}
    diffs = [per[s][1]["heldout_elbo"] - per[s][0]["heldout_elbo"] for s in seeds]
    d = out["diff_ours_minus_ref"] = _stats(diffs)
    ref_mean = abs(out["reference"]["heldout_elbo"]["mean"])
    out["rel_diff"] = {"mean": d["mean"] / ref_mean, "se": d["se"] / ref_mean, "ci95_half": d["ci95_half"] / ref_mean}
    out["decision"] = decide(out["rel_diff"]["mean"], out["rel_diff"]["ci95_half"])
    out["speedup_of_means"] = out["ours"]["cells_per_cpu_s"]["mean"] / out["reference"]["cells_per_cpu_s"]["mean"]
    return out


def print_summary(bs: int, sm: dict) -> None:
    print(f"\n== batch {bs}: held-out ELBO per cell (lower is better), {len(sm['seeds'])} seeds")
    print("seed  reference      ours      ours-ref")
    for s in sm["seeds"]:
        r, o = sm["_per_seed"][s]
        print(f"{s:4d}  {r:9.2f}  {o:9.2f}  {o - r:+9.2f}")
    for side in SIDES:
        e, c, m = (sm[side][k] for k in ("heldout_elbo", "cells_per_cpu_s", "peak_rss_mib"))
        print(f"{side:9s}: ELBO {e['mean']:.2f} +- {e['se']:.2f} s.e. (sd {e['sd']:.2f}, {100 * e['sd'] / e['mean']:.2f} %); "
              f"{c['mean']:.0f} cells/CPU-s ({c['min']:.0f}-{c['max']:.0f}); peak RSS {m['mean']:.0f} MiB "
              f"({m['min']:.0f}-{m['max']:.0f})")
    d, rel = sm["diff_ours_minus_ref"], sm["rel_diff"]
    print(f"ours - ref: {d['mean']:+.2f} +- {d['se']:.2f} s.e. (sd {d['sd']:.2f}); relative {100 * rel['mean']:+.2f} % "
          f"+- {100 * rel['se']:.2f} % s.e., 95 % CI [{100 * (rel['mean'] - rel['ci95_half']):+.2f}, "
          f"{100 * (rel['mean'] + rel['ci95_half']):+.2f}] % -> {sm['decision']}; speed-up of means "
          f"{sm['speedup_of_means']:.2f}x", flush=True)
