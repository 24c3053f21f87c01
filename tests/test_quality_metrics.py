"""Every quality metric on cases with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.quality import metrics as M


def clusters(n_per=60, k=4, d=5, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 10, (k, d))
    labels = np.repeat(np.arange(k), n_per)
    return centers[labels] + rng.normal(0, spread, (k * n_per, d)), labels


def test_knn_accuracy_separated_is_one_and_random_is_chance():
    z, lab = clusters()
    assert M.knn_label_accuracy(z, lab) == 1.0
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(2000, 5))
    assert abs(M.knn_label_accuracy(noise, rng.integers(0, 4, 2000)) - 0.25) < 0.05


def test_label_transfer():
    z, lab = clusters()
    src, tgt = np.arange(0, len(lab), 2), np.arange(1, len(lab), 2)
    assert M.label_transfer_accuracy(z, lab, src, tgt) == 1.0
    rng = np.random.default_rng(2)
    shuffled = lab.copy()
    shuffled[src] = rng.permutation(lab[src])  # source labels carry no information
    assert abs(M.label_transfer_accuracy(z, shuffled, src, tgt) - 0.25) < 0.12
    assert np.isnan(M.label_transfer_accuracy(z, lab, src[:0], tgt))


def test_label_silhouette():
    z, lab = clusters()
    assert M.label_silhouette(z, lab) > 0.95
    rng = np.random.default_rng(3)
    assert abs(M.label_silhouette(rng.normal(size=(600, 5)), rng.integers(0, 3, 600)) - 0.5) < 0.05
    assert np.isnan(M.label_silhouette(z, np.zeros(len(z))))


def test_mixing_asw_mixed_vs_separated():
    rng = np.random.default_rng(4)
    z, lab = clusters(spread=1.0)
    mixed = rng.integers(0, 2, len(z))  # batches drawn independently of position: perfectly mixed
    assert M.mixing_asw(z, mixed, lab) > 0.9
    # batch 1 shifted far away inside each type: fully separated
    zs = z + np.where(mixed[:, None] == 1, 50.0, 0.0)
    assert M.mixing_asw(zs, mixed, lab) < 0.1
    assert np.isnan(M.mixing_asw(z, np.zeros(len(z)), lab))  # one group: nothing to mix
    assert M.mixing_asw(z, mixed) > 0.5  # no labels: all cells one group


def test_imputation_pearson():
    rng = np.random.default_rng(5)
    counts = rng.poisson(rng.gamma(1.0, 3.0, (80, 30))).astype(float)
    counts[:, 0] += 1  # every cell expresses something
    frac = counts / counts.sum(1, keepdims=True)
    g, c = M.imputation_pearson(frac, counts)  # perfect imputation
    assert g == pytest.approx(1.0) and c == pytest.approx(1.0)
    rnd = rng.dirichlet(np.ones(30), 80)
    g, c = M.imputation_pearson(rnd, counts)
    assert abs(g) < 0.15 and abs(c) < 0.2
    with pytest.raises(ValueError, match="shape"):
        M.imputation_pearson(rnd[:, :5], counts)


def test_accessibility_auroc():
    rng = np.random.default_rng(6)
    truth = rng.random((50, 40)) < 0.1
    counts = truth.astype(int) * rng.integers(1, 3, truth.shape)
    assert M.accessibility_auroc(0.2 + 0.5 * truth + 0.01 * rng.random(truth.shape), counts) == 1.0
    assert abs(M.accessibility_auroc(rng.random(truth.shape), counts) - 0.5) < 0.05
    assert np.isnan(M.accessibility_auroc(rng.random((3, 3)), np.zeros((3, 3))))


def test_cross_modality_distance():
    rng = np.random.default_rng(7)
    za = rng.normal(size=(300, 6))
    assert M.foscttm(za, za) == 0.0 and M.relative_match_distance(za, za) == 0.0
    zb = rng.normal(size=(300, 6))  # unrelated versions
    assert abs(M.foscttm(za, zb) - 0.5) < 0.05
    assert abs(M.relative_match_distance(za, zb) - 1.0) < 0.1
    near = za + 0.05 * rng.normal(size=za.shape)
    assert M.foscttm(za, near) < 0.01 and M.relative_match_distance(za, near) < 0.1
