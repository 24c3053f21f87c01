"""Pure statistics of differential expression / accessibility (the reference's semantics, our code).

Inputs are paired sample matrices ``s1``, ``s2`` of shape (S, F): row i of group 1 is compared with
row i of group 2 (the reference pairs its samples the same way when it does not permute). Every
function here is per feature, so a caller may pass one block of features at a time; the only
cross-feature quantities (automatic delta, automatic pseudocounts, the FDR flag) take per-feature
summaries that the caller collects over all blocks.

Reference behaviour kept (spec Part B 5.5):
* vanilla: proba_m1 = P(s1 > s2), bayes_factor = log(p1 + eps) - log(1 - p1 + eps);
* change: lfc = log2(s1 + pc) - log2(s2 + pc); proba_de = max(P(lfc >= delta), P(lfc < -delta))
  ("three") or their sum ("two"); lfc_* summaries use the pseudocount 1e-3 * pc;
* automatic delta: 0.6 x mean |extreme means| of a 3-component Gaussian mixture on per-feature mean
  LFCs, at least 0.1 (seeded here: the reference's mixture is unseeded);
* automatic pseudocount: 0.9-quantile of per-feature max scale over features whose raw mean in the
  group is < 0.01, max over both groups, divided by F, at least 1e-10 (the reference always reads RNA
  counts for the raw means, which is wrong for accessibility; we use the tested modality's);
* FDR: sort proba_de descending, flag the longest prefix whose running mean of (1 - proba_de) <= fdr.
"""

from __future__ import annotations

import zlib

import numpy as np

EPS = 1e-8
DEFAULT_DELTA = {"de": 0.25, "da": 0.05}  # the reference's differential_expression / _accessibility defaults
DEFAULT_PSEUDOCOUNTS = 1e-6
DEFAULT_SAMPLES = 5000  # the reference's n_samples_overall: scale samples per group
ZERO_COUNT_THRESHOLD = 0.01  # raw mean below which a feature counts as "not expressed" (pseudocount estimate)


def sample_cells(cells: np.ndarray, n: int, seed: int, key: str) -> np.ndarray:
    """``n`` cells drawn with replacement from ``cells`` (as the reference's n_samples_overall does).

    A pure function of (cells, n, seed, key): ``key`` names the comparison side, so every group's
    sample is the same whatever other groups are run with it, in any order or on any rank.
    """
    cells = np.asarray(cells, dtype=np.int64)
    if cells.size == 0:
        raise ValueError(f"cannot sample from an empty cell set ({key})")
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    return cells[rng.integers(0, cells.size, size=int(n))]


def derived_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (seed, key): independent streams per comparison side and sample chunk."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(key.encode())]).generate_state(1, np.uint64)[0] >> 1)


def samples_per_batch(n_samples: int, n_batches: int) -> int:
    """Samples per batch category under batch correction: floor(n / n_batches), 2 if that is 0."""
    k = int(n_samples) // max(1, int(n_batches))
    return k if k > 0 else 2


def vanilla_stats(s1: np.ndarray, s2: np.ndarray) -> dict[str, np.ndarray]:
    _check_pair(s1, s2)
    p1 = np.mean(s1 > s2, axis=0)
    p2 = 1.0 - p1
    return {"proba_m1": p1, "proba_m2": p2, "bayes_factor": np.log(p1 + EPS) - np.log(p2 + EPS),
            "scale1": s1.mean(0), "scale2": s2.mean(0)}


def lfc(s1: np.ndarray, s2: np.ndarray, pseudocounts: float) -> np.ndarray:
    return np.log2(s1 + pseudocounts) - np.log2(s2 + pseudocounts)


def change_stats(s1: np.ndarray, s2: np.ndarray, delta: float, pseudocounts: float,
                 test_mode: str = "three") -> dict[str, np.ndarray]:
    """The change-mode columns for one block of features (delta and pseudocounts already chosen)."""
    _check_pair(s1, s2)
    if test_mode not in ("two", "three"):
        raise ValueError(f"test_mode must be 'two' or 'three', got {test_mode!r}")
    if delta is None or not delta >= 0:
        raise ValueError(f"delta must be a number >= 0 here, got {delta!r}")
    r = lfc(s1, s2, pseudocounts)
    p_plus, p_minus = np.mean(r >= delta, axis=0), np.mean(r < -delta, axis=0)
    proba_de = p_plus + p_minus if test_mode == "two" else np.maximum(p_plus, p_minus)
    # summaries with a 1000x smaller pseudocount, as the reference does, so the LFC is not shrunk
    small = lfc(s1, s2, 1e-3 * pseudocounts)
    f = s1.shape[1]
    return {"proba_de": proba_de, "proba_not_de": 1.0 - proba_de,
            "bayes_factor": np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS),
            "scale1": s1.mean(0), "scale2": s2.mean(0),
            "pseudocounts": np.full(f, pseudocounts), "delta": np.full(f, delta),
            "lfc_mean": small.mean(0),
            "lfc_median": np.median(np.ascontiguousarray(small.T), axis=1),  # along rows: faster, same values
            "lfc_std": small.std(0),
            "lfc_min": small.min(0), "lfc_max": small.max(0)}


def estimate_delta(lfc_means: np.ndarray, seed: int = 0, coef: float = 0.6, min_thres: float = 0.1) -> float:
    """Automatic LFC threshold from the per-feature mean LFCs (3-component Gaussian mixture)."""
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:  # scikit-learn is only needed here
        raise ValueError("delta='auto' needs scikit-learn (pip install scikit-learn)") from None

    m = np.asarray(lfc_means, dtype=np.float64)
    if m.ndim != 1 or m.size < 3:
        raise ValueError(f"automatic delta needs a 1-D array of >= 3 per-feature mean LFCs, got shape {m.shape}")
    gmm = GaussianMixture(n_components=3, random_state=seed).fit(m[:, None])
    means = np.sort(gmm.means_.ravel())
    return float(max(min_thres, coef * np.abs(means[[0, -1]]).mean()))


def estimate_pseudocounts(max1: np.ndarray, max2: np.ndarray, zero1: np.ndarray, zero2: np.ndarray,
                          quantile: float = 0.9) -> float:
    """Automatic pseudocount from the per-feature max scale of features not expressed in a group."""
    if not (max1.shape == max2.shape == zero1.shape == zero2.shape):
        raise ValueError("per-feature max scales and zero masks must have the same shape")
    eps = [np.quantile(mx[z], quantile) if z.sum() >= 1 else 1e-10 for mx, z in ((max1, zero1), (max2, zero2))]
    return float(max(1e-10, max(eps) / max1.shape[0]))


def fdr_flags(proba_de: np.ndarray, fdr: float) -> np.ndarray:
    """Boolean per feature (input order): among the top-d by proba_de with expected FDR <= fdr."""
    p = np.asarray(proba_de, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    cumulative = np.cumsum(1.0 - p[order]) / np.arange(1, p.size + 1)
    d = int((cumulative <= fdr).sum())
    out = np.zeros(p.size, dtype=bool)
    out[order[:d]] = True
    return out


def raw_columns(sums: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Per-feature raw means of one group from streamed sums over its ``n`` cells."""
    if n <= 0:
        raise ValueError("raw statistics of an empty group")
    out = {"mean": sums["sum"] / n, "nonzero": sums["nnz"] / n}
    if "norm" in sums:
        out["norm_mean"] = sums["norm"] / n
    return out


def _check_pair(s1: np.ndarray, s2: np.ndarray) -> None:
    if s1.ndim != 2 or s1.shape != s2.shape:
        raise ValueError(f"paired samples must be two (S, F) arrays of the same shape, got {s1.shape} and {s2.shape}")
    if s1.shape[0] == 0:
        raise ValueError("no samples")
