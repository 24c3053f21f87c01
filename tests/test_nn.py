"""Layer blocks: covariate injection widths (incl. the reference asymmetries), fused first layer, norms.

Run: ``.venv/bin/python -m pytest tests/test_nn.py -q``
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from trainer.module import MultiVAE
from trainer.nn import EncoderPair, FCStack, covariate_width, one_hot_covariates


def test_single_level_covariates_are_dropped():
    codes = [torch.tensor([0, 1, 1]), torch.tensor([0, 0, 0]), torch.tensor([2, 0, 1])]
    oh = one_hot_covariates(codes, [2, 1, 3], torch.float64)
    assert oh.shape == (3, 5) and covariate_width([2, 1, 3]) == 5
    assert torch.equal(oh[0], torch.tensor([1.0, 0, 0, 0, 1], dtype=torch.float64))
    assert one_hot_covariates([torch.tensor([0, 0])], [1], torch.float32) is None


def test_first_layer_widths_follow_the_reference_asymmetry():
    """Spec §2.3 example: G=60, R=400, 2 batches, one 3-level covariate, 2 continuous, latent 4."""
    m = MultiVAE(60, 400, n_batch=2, n_cats_per_cov=(3,), n_continuous_cov=2, encode_covariates=True)
    assert m.n_latent == 4 and m.n_hidden == 20
    assert m.rna_decoder.linears[0].in_features == 4 + 2 + 2 + 3
    enc = m.rna_encoder  # counts columns live in the fused input weight, covariate columns in the Linear
    assert enc.input_weight.shape == (60, 2 * 20) and enc.z_stack.linears[0].in_features == 2 + 2 + 3
    assert m.rna_encoder.z_stack.linears[1].in_features == 20  # RNA: deeper blocks only if deep
    assert m.atac_encoder.z_stack.linears[1].in_features == 20 + 5  # ATAC: every block when encoding
    assert m.atac_encoder.lib_stack.linears[1].in_features == 20
    deep = MultiVAE(
        60, 400, n_batch=2, n_cats_per_cov=(3,), n_continuous_cov=2, deeply_inject_covariates=True
    )
    assert deep.rna_decoder.linears[1].in_features == 20 + 5  # one-hots only: continuous enter once
    assert deep.rna_encoder.z_stack.linears[0].in_features == 0  # not encoding covariates: bias only


def test_fcstack_equals_concatenated_input_reference_math():
    """Split-weight first layer == Linear on [x, extra, cov], then LayerNorm(no affine), LeakyReLU."""
    torch.manual_seed(0)
    stack = FCStack(
        7, 5, 2, n_cov=3, n_extra=2, inject_deep=True, activation="leaky_relu", layer_norm=True
    ).double()
    x, extra = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    cov = F.one_hot(torch.tensor([0, 2, 1, 2]), 3).double()
    h = torch.cat([x, extra, cov], 1) @ stack.linears[0].weight.t() + stack.linears[0].bias
    h = F.leaky_relu(F.layer_norm(h, (5,)))
    h = F.leaky_relu(F.layer_norm(stack.linears[1](torch.cat([h, cov], 1)), (5,)))
    torch.testing.assert_close(stack(x, cov, extra), h, rtol=1e-12, atol=1e-12)


def test_fused_encoder_pair_equals_two_plain_stacks():
    """One matmul against the fused (n_in, 2H) weight == two nn.Linear first layers on [x, cov]."""
    torch.manual_seed(0)
    pair = EncoderPair(
        30,
        3,
        8,
        2,
        n_cov=2,
        n_extra=0,
        z_inject_deep=False,
        lib_inject_deep=False,
        dropout=0.0,
        batch_norm=False,
        layer_norm=True,
        library_head="sigmoid",
    ).double()
    x = torch.poisson(torch.rand(6, 30, dtype=torch.float64))
    cov = F.one_hot(torch.tensor([0, 1, 0, 1, 1, 0]), 2).double()

    def plain(stack, cols):
        w = torch.cat([pair.input_weight[:, cols].t(), stack.linears[0].weight], dim=1)
        h = F.leaky_relu(F.layer_norm(torch.cat([x, cov], 1) @ w.t() + stack.linears[0].bias, (8,)))
        return F.leaky_relu(F.layer_norm(stack.linears[1](h), (8,)))

    m, v, lib = pair(x, cov)
    h = plain(pair.z_stack, slice(0, 8))
    torch.testing.assert_close(m, pair.mean(h), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, torch.exp(pair.var(h)), rtol=1e-12, atol=1e-12)
    expected_lib = torch.sigmoid(pair.lib_out(plain(pair.lib_stack, slice(8, 16))))
    torch.testing.assert_close(lib, expected_lib, rtol=1e-12, atol=1e-12)
    assert ((lib > 0) & (lib < 1)).all()
    bound = 1 / (30 + 2) ** 0.5  # nn.Linear's init for the whole first layer
    assert pair.input_weight.abs().max() <= bound and pair.z_stack.linears[0].bias.abs().max() <= bound
    assert pair.z_stack.linears[0].bias.abs().max() > 0


def test_batch_norm_and_dropout_layers():
    stack = FCStack(4, 6, 3, activation="relu", dropout=0.5, batch_norm=True)
    assert len(stack.batch_norms) == 3
    assert stack.batch_norms[0].momentum == 0.01 and stack.batch_norms[0].eps == 1e-3
    stack.train()
    x = torch.randn(64, 4)
    assert not torch.equal(stack(x), stack(x))  # dropout active in training
    stack.eval()
    assert torch.equal(stack(x), stack(x))
    with pytest.raises(ValueError, match="n_layers"):
        FCStack(4, 6, 0)
