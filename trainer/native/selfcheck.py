"""A freshly loaded kernel library must agree with the eager likelihoods before anything trains with it.

One small seeded case per kernel (a few cells, odd feature counts so vector tails are exercised,
stored zeros, counts outside the lgamma tables, saturated probabilities), loss and every gradient,
against the eager code in float64. A miscompiled library, a libm whose vector functions are off, or
a mismatched ABI then costs one warning and the eager path, never a silently wrong model.
"""

from __future__ import annotations

import torch

TOL = 1e-4  # relative to the largest magnitude; float32 kernels agree to ~1e-6 here


def _case(g: torch.Generator, n_cells: int, n_feat: int, density: float) -> torch.Tensor:
    x = (torch.rand(n_cells, n_feat, generator=g) < density) * torch.randint(1, 4, (n_cells, n_feat), generator=g)
    x = x.float()
    x[0, :3] = torch.tensor([0.5, 12.0, 30.0])  # non-integer and beyond-table counts
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _with_stored_zero(x: torch.Tensor) -> torch.Tensor:
    csr = x.to_sparse_csr()
    vals = csr.values().clone()
    vals[1] = 0.0  # a stored zero counts as a zero (target 0 / zero count)
    return torch.sparse_csr_tensor(csr.crow_indices(), csr.col_indices(), vals, x.shape, check_invariants=False)


def check_atac(g: torch.Generator) -> str | None:
    from trainer import fused
    from trainer.native import ops

    x = _with_stored_zero(_case(g, 7, 37, 0.2))
    logits = torch.randn(7, 37, generator=g) * 3
    logits[1, 2] = 40.0  # saturated: q (1 - q) hits the 1e-12 floor with lib * s = 1
    lib = torch.rand(7, 1, generator=g).clamp_min(0.05)
    lib[1] = 1.0
    s = torch.rand(37, generator=g).clamp_min(0.05)
    s[2] = 1.0
    go = torch.rand(7, generator=g)
    leaves32 = [t.clone().requires_grad_() for t in (logits, lib, s)]
    out32 = ops.product_bernoulli_nll_logits(x, *leaves32)
    (out32 * go).sum().backward()
    leaves64 = [t.double().requires_grad_() for t in (logits, lib, s)]
    x64 = torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), x.values().double(), x.shape,
                                  check_invariants=False)
    out64 = fused.product_bernoulli_nll(x64, torch.sigmoid(leaves64[0]), leaves64[1], leaves64[2])
    (out64 * go.double()).sum().backward()
    errs = {"atac loss": _rel(out32.detach(), out64.detach())}
    errs.update({f"atac grad {n}": _rel(a.grad, b.grad) for n, a, b in zip(("logits", "lib", "s"), leaves32, leaves64)})
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    return f"{bad}" if bad else None


def check_zinb(g: torch.Generator) -> str | None:
    from trainer import distributions as D
    from trainer.native import ops

    x = _with_stored_zero(_case(g, 6, 29, 0.35))
    mu = torch.rand(6, 29, generator=g) * 4 + 1e-3
    theta = torch.rand(29, generator=g) * 3 + 0.05
    zi = torch.randn(6, 29, generator=g) * 2
    go = torch.rand(6, generator=g)
    leaves32 = [t.clone().requires_grad_() for t in (mu, theta, zi)]
    out32 = ops.zinb_nll(x, *leaves32)
    (out32 * go).sum().backward()
    leaves64 = [t.double().requires_grad_() for t in (mu, theta, zi)]
    x64 = torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), x.values().double(), x.shape,
                                  check_invariants=False)
    out64 = D.zinb_nll(x64, *leaves64)
    (out64 * go.double()).sum().backward()
    errs = {"zinb loss": _rel(out32.detach(), out64.detach())}
    errs.update({f"zinb grad {n}": _rel(a.grad, b.grad) for n, a, b in zip(("mu", "theta", "zi"), leaves32, leaves64)})
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    return f"{bad}" if bad else None


def self_check() -> str | None:
    """None if both kernels agree with the eager float64 code, else what differed and by how much."""
    g = torch.Generator().manual_seed(1234)  # its own generator: the global RNG stream is not touched
    # the first use may come from inside no_grad / inference_mode / autocast (validation, inference jobs)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        return check_atac(g) or check_zinb(g)
