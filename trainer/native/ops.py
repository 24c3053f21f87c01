"""Autograd Functions over the fused C kernels (``trainer/native/kernels.c``).

Each computes the same per-cell negative log-likelihood and gradients as its eager counterpart
(``trainer.fused.product_bernoulli_nll_logits`` / ``trainer.distributions.zinb_nll`` on CSR counts),
to float32 rounding (tests/test_native.py). Callers check ``available(...)`` first; nothing here
falls back by itself.
"""

from __future__ import annotations

import torch

from trainer import native
from trainer.native import ptr


def available(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """CSR counts, CPU float32 operands, and the library loaded."""
    return x.layout == torch.sparse_csr and x.device.type == "cpu" and native.usable(*tensors)


def _call(name: str, *args) -> None:
    """``kernels.c``'s ``name`` with tensors passed by pointer and the torch thread count appended."""
    getattr(native.library(), name)(*(ptr(a) if isinstance(a, torch.Tensor) else a for a in args),
                                    torch.get_num_threads())


def _csr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 row pointers and columns, float32 values, all contiguous (no copy when already so)."""
    return (x.crow_indices().long().contiguous(), x.col_indices().long().contiguous(),
            x.values().to(torch.float32).contiguous())


class _ProductBernoulliLogitsNLL(torch.autograd.Function):
    """sum_j BCE(sigmoid(logits_cj) * lib_c * s_j, 1[x_cj > 0]) per cell; torch's BCE gradient."""

    @staticmethod
    def forward(ctx, logits, lib, s, crow, col, val):
        B, R = logits.shape
        out = logits.new_empty(B)
        _call("mva_atac_fwd", logits, lib, s, crow, col, val, out, B, R)
        ctx.save_for_backward(logits, lib, s, crow, col, val)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, lib, s, crow, col, val = ctx.saved_tensors
        B, R = logits.shape
        go = grad_out.to(torch.float32).contiguous()
        dx, dlib, ds = torch.empty_like(logits), lib.new_empty(B), s.new_empty(R)
        _call("mva_atac_bwd", logits, lib, s, crow, col, val, go, dx, dlib, ds, B, R)
        return dx, dlib, ds, None, None, None


def product_bernoulli_nll_logits(
    x: torch.Tensor, logits: torch.Tensor, lib: torch.Tensor, s: torch.Tensor | None
) -> torch.Tensor:
    """Per-cell ATAC NLL from the decoder's logits (B, R), library factors (B, 1), region factors (R,)."""
    s_ = s if s is not None else logits.new_ones(logits.shape[1])
    crow, col, val = _csr(x)
    return _ProductBernoulliLogitsNLL.apply(logits.contiguous(), lib.reshape(-1).contiguous(), s_.contiguous(),
                                            crow, col, val)


class _ZinbNLL(torch.autograd.Function):
    """-sum_g log ZINB(x_cg | mu_cg, theta_g, zi_cg) per cell, theta per gene."""

    @staticmethod
    def forward(ctx, mu, theta, zi, crow, col, val):
        B, G = mu.shape
        out = mu.new_empty(B)
        _call("mva_zinb_fwd", mu, theta, zi, crow, col, val, out, B, G)
        ctx.save_for_backward(mu, theta, zi, crow, col, val)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mu, theta, zi, crow, col, val = ctx.saved_tensors
        B, G = mu.shape
        go = grad_out.to(torch.float32).contiguous()
        dmu, dzi, dtheta = torch.empty_like(mu), torch.empty_like(zi), torch.empty_like(theta)
        _call("mva_zinb_bwd", mu, theta, zi, crow, col, val, go, dmu, dzi, dtheta, B, G)
        return dmu, dtheta, dzi, None, None, None


def zinb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """Per-cell ZINB NLL of CSR counts; theta (G,) or (1, G) (one dispersion per gene)."""
    crow, col, val = _csr(x)
    t = theta.reshape(-1)
    return _ZinbNLL.apply(mu.contiguous(), t.contiguous(), zi_logits.contiguous(), crow, col, val)


class _CsrMatmul(torch.autograd.Function):
    """``x @ w`` for CSR ``x`` (B, R; no gradient) and dense ``w`` (R, H), gradient to ``w`` only."""

    @staticmethod
    def forward(ctx, w, crow, col, val):
        B, H = crow.numel() - 1, w.shape[1]
        out = w.new_empty(B, H)
        _call("mva_sparse_mm", crow, col, val, w, out, B, H)
        ctx.save_for_backward(crow, col, val)
        ctx.n_in = w.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        crow, col, val = ctx.saved_tensors
        g = grad.to(torch.float32).contiguous()
        (B, H), R = g.shape, ctx.n_in
        ccol, row_of, val_of = crow.new_empty(R + 1), col.new_empty(col.numel()), val.new_empty(val.numel())
        native.library().mva_csc_index(ptr(crow), ptr(col), ptr(val), B, R, ptr(ccol), ptr(row_of), ptr(val_of))
        dw = g.new_empty(R, H)
        _call("mva_sparse_mm_t", ccol, row_of, val_of, g, dw, R, H)
        return dw, None, None, None


def csr_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` for CSR counts ``x`` and a float32 CPU weight ``w`` stored (n_in, n_out)."""
    crow, col, val = _csr(x)
    return _CsrMatmul.apply(w.contiguous(), crow, col, val)


def csr_to_dense(x: torch.Tensor) -> torch.Tensor:
    """Dense copy of CSR counts ``x``: the C scatter where the kernels load and ``x`` is CPU float32
    (~10x faster than torch's CSR ``to_dense`` on one thread), ``x.to_dense()`` everywhere else."""
    if not (available(x) and x.values().dtype == torch.float32):
        return x.to_dense()
    crow, col, val = _csr(x)
    # on x's device, not torch's default one: under torch.set_default_device("cuda") (or "meta") the C
    # scatter wrote through a non-CPU pointer and crashed the process
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    native.library().mva_csr_dense(ptr(crow), ptr(col), ptr(val), ptr(out), x.shape[0], x.shape[1])
    return out
