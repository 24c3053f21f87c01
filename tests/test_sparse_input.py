"""Sparse-CSR counts give the same outputs and gradients as dense counts (float64, <= 1e-9).

Real BMMC multiome cells (600 genes, 600 peaks) with a mosaic mask; includes a *measured* cell whose
RNA row is empty (the sparse loss must still count its zero terms) and an explicitly stored zero.
Run: ``.venv/bin/python -m pytest tests/test_sparse_input.py -q``
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from data import keys
from trainer import distributions as D
from trainer import fused
from trainer.module import MultiVAE
from trainer.nn import input_matmul, input_matmul_t

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

BMMC = Path("/work/shared/data/neurips2021_bmmc_multiome_starter")
TOL = 1e-9


@pytest.fixture(scope="module")
def bmmc_batch():
    rna = ad.read_h5ad(BMMC / "bmmc_starter_rna.h5ad")
    atac = ad.read_h5ad(BMMC / "bmmc_starter_atac.h5ad")
    n = 48
    x_rna = torch.from_numpy(rna.X[:n].toarray().astype(np.float64))
    x_atac = torch.from_numpy(atac.X[:n].toarray().astype(np.float64))
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[24:36, 1] = False
    mask[36:, 0] = False
    x_rna[36:] = 0
    x_atac[24:36] = 0
    x_rna[5] = 0  # measured RNA with an empty row: loss must be the all-zero likelihood, not dropped
    g = torch.Generator().manual_seed(0)
    return {
        keys.RNA: x_rna,
        keys.ATAC: x_atac,
        keys.MASK: mask,
        keys.BATCH: torch.randint(0, 2, (n,), generator=g),
        keys.CAT_COVS: torch.zeros(n, 0, dtype=torch.long),
        keys.CONT_COVS: torch.zeros(n, 0, dtype=torch.float64),
        keys.INDEX: torch.arange(n),
    }


def to_sparse(batch: dict) -> dict:
    out = dict(batch)
    out[keys.RNA], out[keys.ATAC] = batch[keys.RNA].to_sparse_csr(), batch[keys.ATAC].to_sparse_csr()
    return out


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    assert err <= TOL * max(b.abs().max().item(), 1.0), f"{what}: {err:.3e}"


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
def test_module_sparse_equals_dense(bmmc_batch, likelihood, dispersion):
    torch.manual_seed(0)
    module = MultiVAE(600, 600, n_batch=2, gene_likelihood=likelihood, dispersion=dispersion).double().eval()
    eps = torch.randn(48, module.n_latent, dtype=torch.float64)
    results = []
    for batch in (bmmc_batch, to_sparse(bmmc_batch)):
        module.zero_grad()
        out = module.loss(batch, kl_weight=0.3, eps=eps)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (dense, gd), (sparse, gs) = results
    assert sparse.recon_rna[5] > 0, "a measured empty RNA row must still be scored"
    for field in ("loss", "recon_rna", "recon_atac", "kl", "penalty", "qz_m", "qz_v", "z"):
        assert_close(getattr(sparse, field), getattr(dense, field), field)
    for key in ("lib_rna", "lib_atac", "px_rate", "p"):
        assert_close(sparse.outputs[key], dense.outputs[key], key)
    assert gd.keys() == gs.keys() and len(gd) > 10
    for name in gd:
        assert_close(gs[name], gd[name], f"grad {name}")


def test_likelihoods_with_explicit_stored_zeros():
    """A CSR with explicitly stored 0 values scores like the dense matrix (stored zeros are zeros)."""
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.rand(6, 9, generator=g, dtype=torch.float64) * 2)
    crow = torch.arange(0, 6 * 9 + 1, 9)
    full = torch.sparse_csr_tensor(
        crow, torch.arange(9).repeat(6), x.reshape(-1), size=(6, 9), check_invariants=True
    )  # every entry stored, zeros included
    mu = torch.rand(6, 9, generator=g, dtype=torch.float64) * 3 + 0.1
    theta = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    pi = torch.randn(6, 9, generator=g, dtype=torch.float64)
    q = torch.rand(6, 9, generator=g, dtype=torch.float64) * 0.9
    for sp in (full, x.to_sparse_csr()):
        assert_close(D.zinb_nll(sp, mu, theta, pi), D.zinb_nll(x, mu, theta, pi), "zinb")
        assert_close(D.nb_nll(sp, mu, theta), D.nb_nll(x, mu, theta), "nb")
        assert_close(D.poisson_nll(sp, mu), D.poisson_nll(x, mu), "poisson")
        assert_close(D.bernoulli_nll(sp, q), D.bernoulli_nll(x, q), "bernoulli")
        # the fused ATAC loss: value and gradients (p, lib, s) equal torch's dense BCE on the product
        p = (q + 0.05).requires_grad_()
        lib = torch.rand(6, 1, generator=g, dtype=torch.float64).requires_grad_()
        s = torch.rand(9, generator=g, dtype=torch.float64).requires_grad_()
        fused_value = fused.product_bernoulli_nll(sp, p, lib, s)
        plain = torch.nn.functional.binary_cross_entropy(p * lib * s, (x > 0).double(), reduction="none").sum(
            1
        )
        assert_close(fused_value, plain, "product bernoulli")
        w = torch.randn(6, generator=g, dtype=torch.float64)
        for a, b in zip(
            torch.autograd.grad(fused_value @ w, (p, lib, s)), torch.autograd.grad(plain @ w, (p, lib, s))
        ):
            assert_close(a, b, "product bernoulli grad")


def test_input_matmul_sparse_gradient_matches_dense():
    g = torch.Generator().manual_seed(2)
    x = torch.poisson(torch.rand(7, 30, generator=g, dtype=torch.float64) * 0.3)
    w = torch.randn(5, 30, generator=g, dtype=torch.float64, requires_grad=True)
    out_d = input_matmul(x, w)
    (gd,) = torch.autograd.grad((out_d**2).sum(), w)
    out_s = input_matmul(x.to_sparse_csr(), w)
    (gs,) = torch.autograd.grad((out_s**2).sum(), w)
    assert_close(out_s, out_d, "forward")
    assert_close(gs, gd, "grad")


def test_fused_csr_matmul_gradient_matches_dense():
    """The hand-written CSR backward (x^T @ grad) equals dense autograd, incl. empty rows."""
    g = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.rand(9, 40, generator=g, dtype=torch.float64) * 0.1)
    x[2] = 0
    w = torch.randn(40, 6, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(9, 6, generator=g, dtype=torch.float64)
    (gd,) = torch.autograd.grad((x @ w * up).sum(), w)
    out = input_matmul_t(x.to_sparse_csr(), w)
    (gs,) = torch.autograd.grad((out * up).sum(), w)
    assert_close(out, x @ w, "forward")
    assert_close(gs, gd, "grad")


@pytest.mark.parametrize("theta_rows", [1, 6])
def test_lgamma_tables_are_bit_identical(theta_rows):
    """ZINB/NB on CSR read lgamma(v + theta), its digamma gradient and lgamma(v + 1) from per-gene
    tables for integer counts <= TABLE_MAX: the same libm call on the same float argument, so the
    values and theta gradients equal the direct formulas bit for bit, also with counts above the
    table, non-integer values and a per-cell theta (direct path)."""
    g = torch.Generator().manual_seed(4)
    x = torch.poisson(torch.rand(6, 9, generator=g, dtype=torch.float64) * 3)
    x[0, :3] = torch.tensor([D.TABLE_MAX + 1.0, 57.0, 2.5])  # above the table, large, non-integer
    mu = torch.rand(6, 9, generator=g, dtype=torch.float64) * 3 + 0.1
    pi = torch.randn(6, 9, generator=g, dtype=torch.float64)
    sp = x.to_sparse_csr()
    rows, cols, v = D._nonzeros(sp)
    for name, fn in (("zinb", lambda t: D.zinb_nll(sp, mu, t, pi)), ("nb", lambda t: D.nb_nll(sp, mu, t))):
        theta = (torch.rand(theta_rows, 9, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
        w = torch.randn(6, generator=g, dtype=torch.float64)
        (grad,) = torch.autograd.grad(fn(theta) @ w, theta)
        # the direct torch calls at the nonzeros (the gather's backward is the same index_add)
        th = D._gather(theta, rows, cols)
        direct = {"shifted": torch.lgamma(v + th), "count": torch.lgamma(v + 1)}
        shifted, count = D._lgamma_terms(theta, v, rows, cols)
        assert torch.equal(shifted, direct["shifted"]) and torch.equal(count, direct["count"]), name
        (g_tab,) = torch.autograd.grad(shifted @ torch.arange(v.numel(), dtype=v.dtype), theta)
        (g_dir,) = torch.autograd.grad(direct["shifted"] @ torch.arange(v.numel(), dtype=v.dtype), theta)
        assert torch.equal(g_tab, g_dir), f"{name}: digamma table gradient differs"
        assert torch.isfinite(grad).all()
    assert torch.equal(D._Counts(v).lgamma_plus_one(), torch.lgamma(v + 1))


@pytest.mark.parametrize("theta_rows", [1, 6])
def test_fused_zinb_gradients_match_dense_autograd(theta_rows):
    """The CSR ZINB's hand-derived backward equals autograd through the dense reference formula
    (<= 1e-12 relative) for mu, theta (per gene and per cell) and the zero-inflation logits, with an
    explicitly stored zero, counts above the lgamma table and a non-integer value."""
    g = torch.Generator().manual_seed(5)
    x = torch.poisson(torch.rand(6, 9, generator=g, dtype=torch.float64) * 3)
    x[0, :3] = torch.tensor([D.TABLE_MAX + 3.0, 57.0, 2.5])
    x[1] = 0  # an empty row
    dense_csr = x.to_sparse_csr()
    stored = torch.sparse_csr_tensor(  # every entry stored, zeros included
        torch.arange(0, 6 * 9 + 1, 9), torch.arange(9).repeat(6), x.reshape(-1), size=(6, 9)
    )
    mu = (torch.rand(6, 9, generator=g, dtype=torch.float64) * 3 + 0.01).requires_grad_()
    theta = (torch.rand(theta_rows, 9, generator=g, dtype=torch.float64) + 0.2).requires_grad_()
    zi = torch.randn(6, 9, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(6, generator=g, dtype=torch.float64)
    expected = D.zinb_nll(x, mu, theta, zi)
    want = torch.autograd.grad(expected @ w, (mu, theta, zi))
    for sp in (dense_csr, stored):
        got_value = D.zinb_nll(sp, mu, theta, zi)
        got = torch.autograd.grad(got_value @ w, (mu, theta, zi))
        assert (got_value - expected).abs().max() <= 1e-12 * expected.abs().max()
        for name, a, b in zip(("mu", "theta", "zi"), got, want, strict=True):
            assert (a - b).abs().max() <= 1e-12 * b.abs().max(), f"grad {name}"
