"""Quality metrics on latents and imputations (scikit-learn underneath; pure functions of arrays).

Label conservation: leave-one-out kNN label accuracy, kNN label transfer (e.g. paired -> RNA-only),
label silhouette rescaled to [0, 1] ((s + 1) / 2, as scib's ``silhouette``).
Mixing: scib-style ASW ("silhouette_batch"): within each cell type, the silhouette of every cell
with respect to the groups to mix (batches, or modalities paired / RNA-only / ATAC-only), mapped to
1 - |s| (1 = groups indistinguishable, 0 = separated), averaged per type, then over types. Types
present in only one group are skipped, like scib does. Without labels, all cells form one type.
Imputation: Pearson correlation per gene and per cell of log1p(1e4 * fraction) of imputed vs true
expression; AUROC of imputed accessibility probabilities against the true peaks (count > 0).
Cross-modality: FOSCTTM (fraction of samples closer than the true match; 0 = every cell's RNA
version is nearest to its own ATAC version, 0.5 = random) and the mean distance between the two
versions of a cell relative to the mean distance between versions of different cells (0 = equal,
about 1 = no better than a random other cell).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import pairwise_distances, roc_auc_score, silhouette_samples, silhouette_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

NAN = float("nan")


def knn_label_accuracy(z: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Leave-one-out accuracy of a majority vote among each cell's k nearest other cells."""
    labels = np.asarray(labels)
    if len(labels) < 2:
        return NAN
    k = min(k, len(labels) - 1)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)
    codes, inv = np.unique(labels, return_inverse=True)
    hits = 0
    for i, row in enumerate(idx):
        nb = row[row != i][:k]
        votes = np.bincount(inv[nb], minlength=len(codes))
        hits += int(np.argmax(votes) == inv[i])
    return hits / len(labels)


def label_transfer_accuracy(z: np.ndarray, labels: np.ndarray, source: np.ndarray, target: np.ndarray,
                            k: int = 15) -> float:
    """Accuracy on ``target`` cells of a kNN classifier fitted on ``source`` cells' labels."""
    if len(source) == 0 or len(target) == 0:
        return NAN
    clf = KNeighborsClassifier(n_neighbors=min(k, len(source))).fit(z[source], np.asarray(labels)[source])
    return float(np.mean(clf.predict(z[target]) == np.asarray(labels)[target]))


def label_silhouette(z: np.ndarray, labels: np.ndarray) -> float:
    """(silhouette + 1) / 2 of the labels in the latent: 1 = tight separated types, 0.5 = overlapping."""
    n_lab = len(np.unique(labels))
    if n_lab < 2 or n_lab >= len(labels):
        return NAN
    return (float(silhouette_score(z, labels)) + 1) / 2


def mixing_asw(z: np.ndarray, groups: np.ndarray, labels: np.ndarray | None = None) -> float:
    """scib-style mixing score of ``groups`` (batches or modalities) within each label; NaN if unmeasurable."""
    groups = np.asarray(groups)
    labels = np.zeros(len(groups), dtype=int) if labels is None else np.asarray(labels)
    per_label = []
    for lab in np.unique(labels):
        sel = labels == lab
        g = groups[sel]
        n_g = len(np.unique(g))
        if n_g < 2 or n_g >= sel.sum():  # one group only (nothing to mix) or silhouette undefined
            continue
        s = silhouette_samples(z[sel], g)
        per_label.append(float(np.mean(1 - np.abs(s))))
    return float(np.mean(per_label)) if per_label else NAN


def _log_norm(x: np.ndarray) -> np.ndarray:
    tot = x.sum(1, keepdims=True)
    return np.log1p(1e4 * x / np.where(tot > 0, tot, 1))


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    ok = den > 0
    return ((a * b).sum(1)[ok] / den[ok])


def imputation_pearson(imputed: np.ndarray, true_counts) -> tuple[float, float]:
    """(mean per-gene r, mean per-cell r) of log-normalised imputed vs true expression.

    Genes (cells) without variance in either matrix are left out (r is undefined there).
    """
    t = true_counts.toarray() if sp.issparse(true_counts) else np.asarray(true_counts, dtype=float)
    if t.shape != imputed.shape:
        raise ValueError(f"imputed {imputed.shape} and true {t.shape} expression differ in shape")
    if t.shape[0] < 2:
        return NAN, NAN
    a, b = _log_norm(np.asarray(imputed, dtype=float)), _log_norm(t.astype(float))
    per_gene, per_cell = _rowwise_pearson(a.T, b.T), _rowwise_pearson(a, b)
    return (float(per_gene.mean()) if len(per_gene) else NAN, float(per_cell.mean()) if len(per_cell) else NAN)


def accessibility_auroc(prob: np.ndarray, true_counts) -> float:
    """AUROC of imputed accessibility for telling open (count > 0) from closed (cell, peak) pairs."""
    t = (true_counts.toarray() if sp.issparse(true_counts) else np.asarray(true_counts)) > 0
    if t.shape != prob.shape:
        raise ValueError(f"imputed {prob.shape} and true {t.shape} accessibility differ in shape")
    if t.size == 0 or t.all() or not t.any():
        return NAN
    return float(roc_auc_score(t.ravel(), np.asarray(prob).ravel()))


def foscttm(za: np.ndarray, zb: np.ndarray) -> float:
    """Fraction of samples closer than the true match, averaged over both directions."""
    n = len(za)
    if n < 2:
        return NAN
    d = pairwise_distances(za, zb)
    true = np.diag(d)
    closer_a = (d < true[:, None]).sum(1) / (n - 1)  # from each a_i: b_j closer than b_i
    closer_b = (d < true[None, :]).sum(0) / (n - 1)  # from each b_j: a_i closer than a_j
    return float((closer_a.mean() + closer_b.mean()) / 2)


def relative_match_distance(za: np.ndarray, zb: np.ndarray) -> float:
    """Mean distance between the two versions of the same cell / mean distance between different cells."""
    n = len(za)
    if n < 2:
        return NAN
    d = pairwise_distances(za, zb)
    off = (d.sum() - np.trace(d)) / (n * (n - 1))
    return float(np.mean(np.diag(d)) / off) if off > 0 else NAN
