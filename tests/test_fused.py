"""The logits form of the ATAC likelihood and its compiled kernels compute torch's BCE exactly.

``fused.product_bernoulli_nll_logits`` (dense kernels of ``trainer/fused.py`` + sparse correction) must give
the value and the gradients (logits, lib, s) of ``F.binary_cross_entropy(sigmoid(logits) * lib * s,
1[x > 0])`` in float64 (<= 1e-9), including saturated entries where torch clamps its logs at -100 and
its gradient denominator at 1e-12; with ``compile_kernels=True`` a module's loss and every gradient
equal the eager module's; a failing compiler falls back to the eager kernel with a warning.
Run: ``.venv/bin/python -m pytest tests/test_fused.py -q`` (the compiled test is marked slow).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from trainer import fused
from trainer.module import MultiVAE

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
TOL = 1e-9


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    assert err <= TOL * max(b.abs().max().item(), 1.0), f"{what}: {err:.3e}"


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(7, 50, generator=g, dtype=torch.float64) * 0.4)
    x[3] = 0  # a cell without any open region
    logits = torch.randn(7, 50, generator=g, dtype=torch.float64) * 3
    logits[0, :10] = 60.0  # p == 1 in float64: q = lib * s, log(1 - q) finite; with lib = s = 1 clamped
    logits[1, :10] = -300.0  # q ~ 1e-131: log q clamped at -100, gradient denominator clamped at 1e-12
    x[1, 0] = 2.0  # ... at an open region (target 1)
    lib = torch.rand(7, 1, generator=g, dtype=torch.float64)
    lib[0] = 1.0
    s = torch.rand(50, generator=g, dtype=torch.float64)
    s[:5] = 1.0
    return x, logits, lib, s


@pytest.mark.parametrize("layout", ["dense", "csr"])
@pytest.mark.parametrize("with_s", [True, False])
def test_logits_form_equals_torch_bce(layout, with_s):
    x, logits, lib, s = _case(0)
    logits.requires_grad_()
    lib.requires_grad_()
    s = s.requires_grad_() if with_s else None
    xin = x.to_sparse_csr() if layout == "csr" else x
    ours = fused.product_bernoulli_nll_logits(xin, logits, lib, s, compiled=False)
    q = torch.sigmoid(logits) * lib * (s if s is not None else 1.0)
    ref = F.binary_cross_entropy(q, (x > 0).double(), reduction="none").sum(1)
    _close(ours, ref, "value")
    assert ref[1] >= 100, "the saturated row must exercise torch's -100 log clamp"
    w = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inputs = (logits, lib, s) if with_s else (logits, lib)
    for a, b, name in zip(
        torch.autograd.grad(ours @ w, inputs), torch.autograd.grad(ref @ w, inputs), ("logits", "lib", "s")
    ):
        _close(a, b, f"grad {name}")


def test_failed_compile_falls_back_to_eager_with_warning():
    kernel = fused._Kernel(fused.atac_dense_forward)

    def broken(*args):
        raise RuntimeError("no C++ compiler on this machine")

    kernel.compiled = broken  # what torch.compile hands back when inductor cannot build
    _, logits, lib, s = _case(2)
    with pytest.warns(RuntimeWarning, match="using the eager kernel"):
        out = kernel(logits, lib, s, compiled=True)
    assert kernel.failed
    _close(out, fused.atac_dense_forward(logits, lib, s), "fallback value")
    assert torch.equal(kernel(logits, lib, s, compiled=True), out)  # no second attempt, no warning


@pytest.mark.slow
def test_compiled_module_equals_eager_module():
    """compile_kernels=True: same loss terms and gradients as the default module (float64)."""
    x, _, _, _ = _case(3)
    g = torch.Generator().manual_seed(4)
    n = x.shape[0]
    batch = {
        "rna": torch.poisson(torch.rand(n, 30, generator=g, dtype=torch.float64)).to_sparse_csr(),
        "atac": x.to_sparse_csr(),
        "mask": torch.ones(n, 2, dtype=torch.bool),
        "batch": torch.tensor([0, 1, 0, 1, 0, 1, 0]),
        "cat_covs": torch.zeros(n, 0, dtype=torch.long),
        "cont_covs": torch.zeros(n, 0, dtype=torch.float64),
        "index": torch.arange(n),
    }
    eps = torch.randn(n, 4, generator=g, dtype=torch.float64)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        module = MultiVAE(30, 50, n_batch=2, n_latent=4, dropout_rate=0.0, compile_kernels=compiled)
        module = module.double()
        out = module.loss(batch, kl_weight=0.5, eps=eps)
        out.loss.backward()
        results.append((out, {k: p.grad for k, p in module.named_parameters() if p.grad is not None}))
    assert not fused.atac_forward.failed and not fused.atac_backward.failed, "inductor did not compile"
    (eager, ge), (comp, gc) = results
    for field in ("loss", "recon_rna", "recon_atac", "kl"):
        _close(getattr(comp, field), getattr(eager, field), field)
    assert ge.keys() == gc.keys()
    for name in ge:
        _close(gc[name], ge[name], f"grad {name}")
