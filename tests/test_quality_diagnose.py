"""End-of-training diagnostics of the quality harness (trainer/quality/diagnose.py): the Jeffreys parts
against torch.distributions' KL (an independent formula), and the diagnostics against the module's
own penalty and loss on real BMMC cells."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.distributions import Normal, kl_divergence

from data.split import cell_hash, is_validation
from trainer.config import ModelConfig
from trainer.module import MultiVAE
from trainer.quality.data import read_pair
from trainer.quality.diagnose import _jeffreys_parts, diagnostics
from trainer.quality.evaluate import _batch
from trainer.quality.scenario import make_scenario, training_view

BMMC = Path("/work/shared/data/neurips2021_bmmc_multiome_starter")
if not BMMC.is_dir():
    BMMC = Path(__file__).resolve().parents[2] / "shared/data/neurips2021_bmmc_multiome_starter"


def test_jeffreys_parts_match_the_symmetric_kl_with_the_reference_convention():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    v1, v2 = torch.rand(5, 3, generator=g) + 0.1, torch.rand(5, 3, generator=g) + 0.1
    var_part, mean_part = _jeffreys_parts(m1, v1, m2, v2)
    # the reference passes sqrt(v) where a variance belongs: Normal scale = v ** 0.25
    p, q = Normal(m1, v1 ** 0.25), Normal(m2, v2 ** 0.25)
    want = (kl_divergence(p, q) + kl_divergence(q, p)).sum(1)
    torch.testing.assert_close(var_part + mean_part, want)
    # identical posteriors: no penalty; equal variances: the variance part is exactly 0
    z = _jeffreys_parts(m1, v1, m1, v1)
    assert torch.all(z[0].abs() < 1e-6) and torch.all(z[1] == 0)
    assert torch.all(_jeffreys_parts(m1, v1, m2, v1)[0].abs() < 1e-6)


def test_diagnostics_agree_with_the_module_on_real_cells():
    data = read_pair(BMMC / "bmmc_starter_rna.h5ad", BMMC / "bmmc_starter_atac.h5ad", "batch", "cell_type")
    sc = make_scenario(data.n_cells, 0.25, 1)
    train = ~is_validation(cell_hash(data.cell_ids), 0.1)
    codes = np.searchsorted(sorted(set(data.batch)), data.batch).astype(np.int64)
    torch.manual_seed(0)
    module = MultiVAE(n_genes=len(data.gene_names), n_regions=len(data.region_names), n_batch=2,
                      n_obs=data.n_cells, **asdict(ModelConfig())).eval()
    view_rna, view_atac = training_view(sc, data.rna, data.atac)
    unpaired = np.concatenate([sc.rna_only, sc.atac_only])
    d = diagnostics(module, view_rna, view_atac, data.rna, data.atac, sc.mask, codes, train, sc.paired, unpaired)
    assert all(np.isfinite(v) for v in d.values()), d
    # the paired penalty is the module's own penalty of the paired training cells
    p = np.intersect1d(sc.paired, np.flatnonzero(train))
    with torch.no_grad():
        b = _batch(data.rna[p], data.atac[p], sc.mask[p], codes[p])
        lo = module.loss(b, eps=torch.zeros(len(p), module.n_latent))
    assert np.isclose(d["diag_penalty_paired"], float(lo.penalty.mean()), rtol=1e-5)
    assert np.isclose(d["diag_penalty_paired_var"] + d["diag_penalty_paired_mean"], d["diag_penalty_paired"],
                      rtol=1e-5)
    # in the training loss the penalty is spread over all training cells, only paired ones pay it
    assert np.isclose(d["diag_train_penalty_per_cell"], d["diag_penalty_paired"] * len(p) / train.sum(), rtol=1e-4)
    assert d["diag_qzv_rna"] > 0 and d["diag_qzv_atac"] > 0
