"""MultiVAE behaviour that parity alone does not show: the explicit mask, mixing weights, the loss
composition, option validation and error messages. Real PBMC cells.

Run: ``.venv/bin/python -m pytest tests/test_module.py -q``
"""

from __future__ import annotations

import math

import pytest
import torch

from data import keys
from tests.test_parity import load_pbmc_counts, make_batch
from trainer.module import LossOutput, MultiVAE

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


@pytest.fixture
def pbmc_counts():
    return load_pbmc_counts()


def _module(**kw) -> MultiVAE:
    torch.manual_seed(0)
    return MultiVAE(45, 174, n_batch=2, **kw).double().eval()


def test_mask_comes_from_the_batch_not_row_sums(pbmc_counts):
    """A measured cell with an empty RNA row is scored; a cell marked missing is not, whatever its counts."""
    module = _module()
    batch = make_batch(pbmc_counts)
    batch[keys.RNA][0] = 0  # paired cell, RNA measured but empty
    batch[keys.RNA][9] = pbmc_counts[0][0]  # ATAC-only cell (mask False) that has RNA counts
    out = module.loss(batch, eps=torch.zeros(12, module.n_latent, dtype=torch.float64))
    assert out.recon_rna[0] > 0 and out.recon_rna[9] == 0
    assert (out.recon_atac[6:9] == 0).all() and (out.recon_atac[:6] > 0).all()
    assert (out.penalty[6:] == 0).all() and (out.penalty[:6] > 0).all()  # Jeffreys only for paired cells


def test_masked_softmax_weights_reproduce_the_reference_third_slot():
    module = _module()
    mask = torch.tensor([[True, True], [True, False], [False, True], [False, False]])
    alpha = module.modality_alpha(mask, None)
    torch.testing.assert_close(alpha[0, :2], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert 0 < alpha[0, 2] < 1e-30  # protein slot: 1e-30 / (2e + 1e-30)
    torch.testing.assert_close(
        alpha[1, :2], torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-29, rtol=0
    )
    torch.testing.assert_close(alpha[3], torch.full((3,), 0.25, dtype=torch.float64))  # no modality: 1/4 each


def test_loss_output_composition(pbmc_counts):
    module = _module()
    batch = make_batch(pbmc_counts)
    out = module.loss(batch, kl_weight=0.25, eps=torch.zeros(12, module.n_latent, dtype=torch.float64))
    assert isinstance(out, LossOutput)
    for name in ("recon_rna", "recon_atac", "kl", "penalty"):
        assert getattr(out, name).shape == (12,)
    assert out.z.shape == out.qz_m.shape == out.qz_v.shape == (12, module.n_latent)
    expected = (out.recon_rna + out.recon_atac + 0.25 * out.kl + out.penalty).mean()
    torch.testing.assert_close(out.loss, expected)
    # joint posterior of a paired cell: mean of the two means, variance (v1 + v2) / sqrt(2)
    o = out.outputs
    torch.testing.assert_close(out.qz_m[0], (o["qzm_rna"][0] + o["qzm_atac"][0]) / 2)
    torch.testing.assert_close(out.qz_v[0], (o["qzv_rna"][0] + o["qzv_atac"][0]) / math.sqrt(2))
    torch.testing.assert_close(out.qz_m[6], o["qzm_rna"][6])  # RNA-only cell: RNA posterior unchanged


def test_cell_weights_need_n_obs_and_index(pbmc_counts):
    with pytest.raises(ValueError, match="n_obs"):
        MultiVAE(45, 174, modality_weights="cell")
    module = MultiVAE(45, 174, modality_weights="cell", n_obs=40).double()
    batch = make_batch(pbmc_counts)
    del batch[keys.INDEX]
    with pytest.raises(ValueError, match="index"):
        module.loss(batch)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"gene_likelihood": "gaussian"}, "gene_likelihood"),
        ({"dispersion": "gene-label"}, "dispersion"),
        ({"modality_penalty": "KL"}, "modality_penalty"),
        ({"use_layer_norm": "all"}, "use_layer_norm"),
        ({"n_batch": 0}, "n_batch"),
        # silently wrong before: a negative rate dropped nothing, 1.0 zeroed every encoder activation
        ({"dropout_rate": -0.1}, "dropout_rate must be in \\[0, 1\\), got -0.1"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        # tracebacks from deep inside the first forward before
        ({"n_latent": 0}, "n_latent must be >= 1"),
        ({"n_hidden": 0}, "n_hidden must be >= 1"),
        ({"n_layers_decoder": 0}, "n_layers_decoder must be >= 1"),
        ({"n_cats_per_cov": (3, 0)}, "n_cats_per_cov"),
        ({"n_continuous_cov": -1}, "n_continuous_cov"),
    ],
)
def test_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        MultiVAE(45, 174, **kw)


def test_wrong_feature_count_is_reported(pbmc_counts):
    module = MultiVAE(44, 174).double()
    with pytest.raises(ValueError, match="batch\\['rna'\\] has 45 columns, the module expects 44"):
        module.loss(make_batch(pbmc_counts))


def test_size_factors_replace_library_networks(pbmc_counts):
    module = _module(use_size_factor=True)
    assert not hasattr(module.rna_encoder, "lib_stack")
    batch = make_batch(pbmc_counts, size_factor=True)
    out = module.loss(batch, eps=torch.zeros(12, module.n_latent, dtype=torch.float64))
    sf = batch[keys.SIZE_FACTOR]
    torch.testing.assert_close(out.outputs["lib_rna"][:, 0], torch.log(sf[:, 0] + 1e-6))
    torch.testing.assert_close(out.outputs["lib_atac"][:, 0], sf[:, 1])
    # softplus, not softmax (the loss decodes RNA for the 9 RNA-measured cells only)
    n_rna = int(batch[keys.MASK][:, 0].sum())
    assert not torch.allclose(out.outputs["px_scale"].sum(1), torch.ones(n_rna, dtype=torch.float64))


def test_float32_sparse_training_input_is_accepted(pbmc_counts):
    """The loader's format: float32 CSR counts; a float32 module runs without host densification."""
    module = MultiVAE(45, 174, n_batch=2)
    batch = make_batch(pbmc_counts)
    batch[keys.RNA] = batch[keys.RNA].float().to_sparse_csr()
    batch[keys.ATAC] = batch[keys.ATAC].float().to_sparse_csr()
    batch[keys.CONT_COVS] = batch[keys.CONT_COVS].float()
    out = module.loss(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and module.atac_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"gene_likelihood": "nb"},
        {"gene_likelihood": "poisson"},
        {"use_size_factor": True},
        {"dispersion": "gene-cell", "modality_weights": "universal"},
        {"n_cats_per_cov": (3,), "n_continuous_cov": 2, "encode_covariates": True},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "defaults",
)
def test_every_parameter_gets_a_gradient(pbmc_counts, kw):
    """DDP without find_unused_parameters stalls on a parameter the loss never touches: build none."""
    module = _module(**kw).train()
    batch = make_batch(pbmc_counts, n_cats=kw.get("n_cats_per_cov", ()), n_cont=kw.get("n_continuous_cov", 0),
                       size_factor=kw.get("use_size_factor", False))  # fmt: skip
    module.loss(batch).loss.backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
