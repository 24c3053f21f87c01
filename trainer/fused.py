"""The ATAC likelihood: hand-fused autograd Functions and dense kernels, optionally compiled.

``product_bernoulli_nll`` (probability form, the eager default) and ``product_bernoulli_nll_logits``
(logits form; its dense part through the kernels below) score the (cell, region) Bernoulli of
q = p * lib * s against 1[x > 0] for dense or CSR ``x``.

The ATAC term touches every (cell, region) entry (128 x 10^4 per step at the benchmark sizes), and in
eager mode each elementwise op is one more pass over a 5 MB array: on one CPU core those passes, not
the arithmetic, dominate the loss (~10 passes forward + backward, ~8 ms per step). Compiled by
inductor, each kernel below becomes one fused loop (~1 ms forward + backward). The functions are pure
and gradient-free: ``trainer.distributions`` wraps them in a hand-written autograd Function, so
autograd never traces through the compiled code and the gradient convention (torch's BCE gradient,
``(q - t) / max(q (1 - q), 1e-12)``) is exactly the eager one.

Compilation is opt-in (``MultiVAE(compile_kernels=True)``, ``model.compile_kernels``): it costs
~30 s of CPU the first time on a machine (cached on disk afterwards, ~8 s per new process), which only
pays off over thousands of steps. If inductor is unavailable or fails (no C++ compiler, unsupported
platform) the eager versions are used after one warning, so the option never breaks a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from trainer.distributions import _gather, _nonzeros, _row_sum

# torch's BCE backward clamps q (1 - q) at a C++ *float* 1e-12, so in float64 the bound is 1e-12
# rounded to float32 (9.99999996e-13): gradients at saturated entries then match torch's to the last bit
BCE_DEN_MIN = float(torch.tensor(1e-12, dtype=torch.float32))
_LOG_MIN = -100.0  # torch's BCE clamps its logs here


def atac_dense_forward(logits: torch.Tensor, lib: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per cell sum_j clamp(log(1 - q_cj), -100), q = sigmoid(logits) * lib * s (every entry a target 0)."""
    q = torch.sigmoid(logits) * (lib * s)
    return torch.clamp(torch.log(1 - q), min=_LOG_MIN).sum(-1)


def atac_dense_backward(
    logits: torch.Tensor, lib: torch.Tensor, s: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_c grad_out_c * BCE(q_c., 0) for (logits (B, R), lib (B, 1), s (R,)).

    With g = grad_out * dBCE/dq (target 0): dlogits = g * lib * s * p (1 - p), dlib = sum_j g p s,
    ds = sum_c g p lib. The targets-1 entries are corrected sparsely by the caller.
    """
    p = torch.sigmoid(logits)
    ls = lib * s
    q = p * ls
    g = q / torch.clamp(q * (1 - q), min=BCE_DEN_MIN) * grad_out.unsqueeze(1)
    gp = g * p
    return gp * ls * (1 - p), (gp * s).sum(1, keepdim=True), (gp * lib).sum(0)


class _Kernel:
    """Calls the compiled function, or the eager one if compiling is off or has failed once."""

    def __init__(self, fn: Callable):
        self.eager = fn
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args, compiled: bool = False):
        if not compiled or self.failed:
            return self.eager(*args)
        if self.compiled is None:
            # dynamic=None: static shapes first; a second batch size recompiles once with a symbolic size
            self.compiled = torch.compile(self.eager, fullgraph=True)
        try:
            return self.compiled(*args)
        except (RuntimeError, ImportError, OSError) as exc:  # no/broken inductor: eager computes the same
            self.failed = True
            warnings.warn(
                f"torch.compile of {self.eager.__name__} failed ({type(exc).__name__}: {exc}); "
                "using the eager kernel (same results, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.eager(*args)


atac_forward = _Kernel(atac_dense_forward)
atac_backward = _Kernel(atac_dense_backward)


class _ProductBernoulliNLL(torch.autograd.Function):
    """Per-cell BCE of q = p * lib * s against 1[x > 0], with a hand-fused backward.

    The ATAC term touches every (cell, region) entry several times; autograd would keep ~20 dense
    passes (two products, clamp, log and their backward graphs). This computes the same value and the
    gradient torch's BCE defines, dBCE/dq = (q - t) / max(q (1 - q), 1e-12), in ~14 passes, and the
    reductions for lib and s as matrix-vector products.
    """

    @staticmethod
    def forward(ctx, p, lib, s, rows, cols, pos):
        # in-place ops on the (B, R) temporaries: fresh multi-MB allocations cost as much as the math
        ls = lib * s if s is not None else lib.expand_as(p)
        q = p * ls
        log_1mq = torch.rsub(q, 1).log_().clamp_min_(-100)
        corr = (torch.log(_gather(q, rows, cols)).clamp_min_(-100) - _gather(log_1mq, rows, cols)) * pos
        loss = -(log_1mq.sum(-1) + _row_sum(corr, rows, p.shape[0]))
        ctx.save_for_backward(p, lib, s if s is not None else torch.empty(0), ls, q, rows, cols, pos)
        ctx.has_s = s is not None
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        p, lib, s, ls, q, rows, cols, pos = ctx.saved_tensors
        den = torch.rsub(q, 1).mul_(q).clamp_min_(BCE_DEN_MIN)
        qn, dn = _gather(q, rows, cols), _gather(den, rows, cols)
        g = torch.div(q, den, out=den)  # target 0 everywhere ...
        # ... target 1 where x > 0 (the (row, col) pairs are unique: scatter_ is the same copy, ~1.5x faster)
        g.view(-1).scatter_(0, rows * g.shape[1] + cols, (qn - pos) / dn)
        g.mul_(grad_out.unsqueeze(1))
        grad_p = g * ls if ctx.needs_input_grad[0] else None
        gp = g.mul_(p)  # reuse the buffer: g is not needed any more
        grad_lib = grad_s = None
        if ctx.needs_input_grad[1]:
            grad_lib = (gp @ s if ctx.has_s else gp.sum(1)).unsqueeze(1)
        if ctx.has_s and ctx.needs_input_grad[2]:
            grad_s = (lib.reshape(1, -1) @ gp).reshape(-1)
        return grad_p, grad_lib, grad_s, None, None, None


def product_bernoulli_nll(
    x: torch.Tensor, p: torch.Tensor, lib: torch.Tensor, s: torch.Tensor | None
) -> torch.Tensor:
    """sum_j BCE(p_cj * lib_c * s_j, 1[x_cj > 0]) per cell; x dense or CSR; lib (B, 1); s (R,) or None."""
    if x.layout == torch.sparse_csr:
        rows, cols, v = _nonzeros(x)
        pos = (v > 0).to(p.dtype)  # stored zeros stay targets 0 (a weight, not a filter: no GPU sync)
    else:
        rows, cols = (x > 0).nonzero(as_tuple=True)
        pos = torch.ones(rows.shape, dtype=p.dtype, device=p.device)
    return _ProductBernoulliNLL.apply(p.contiguous(), lib, s, rows, cols, pos)  # flat-view gradients


class _ProductBernoulliLogitsNLL(torch.autograd.Function):
    """The same per-cell BCE as ``_ProductBernoulliNLL``, from the decoder's logits (p = sigmoid).

    Split into a dense part that scores every entry as a target 0 (``trainer.fused`` kernels: one
    fused loop each when compiled; the sigmoid and its backward are folded in) and a sparse
    correction at the stored nonzeros (target 1), so no (B, R) intermediate is saved for backward
    and the compiled kernels see only fixed shapes. Gradient convention as torch's BCE.
    """

    @staticmethod
    def forward(ctx, logits, lib, s, rows, cols, pos, compiled):
        s_ = s if s is not None else torch.ones(logits.shape[1], dtype=logits.dtype, device=logits.device)
        dense = atac_forward(logits, lib, s_, compiled=compiled)
        # index_select, not t[idx]: the same gather without advanced indexing's overhead (~4x faster)
        qn = torch.sigmoid(_gather(logits, rows, cols)) * (
            lib.reshape(-1).index_select(0, rows) * s_.index_select(0, cols)
        )
        corr = (torch.log(qn).clamp_min_(-100) - torch.log(1 - qn).clamp_min_(-100)) * pos
        ctx.save_for_backward(logits, lib, s_, rows, cols, pos)
        ctx.has_s, ctx.compiled = s is not None, compiled
        return -(dense + _row_sum(corr, rows, logits.shape[0]))

    @staticmethod
    def backward(ctx, grad_out):
        logits, lib, s, rows, cols, pos = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_logits, grad_lib, grad_s = atac_backward(logits, lib, s, grad_out, compiled=ctx.compiled)
        # targets 1: dBCE/dq = (q - 1) / den instead of q / den, i.e. add -pos / den at the nonzeros
        pn = torch.sigmoid(_gather(logits, rows, cols))
        lib_n, s_n = lib.reshape(-1).index_select(0, rows), s.index_select(0, cols)
        lsn = lib_n * s_n
        qn = pn * lsn
        delta = -pos / torch.clamp(qn * (1 - qn), min=BCE_DEN_MIN) * grad_out.index_select(0, rows)
        dp = delta * pn
        grad_logits.view(-1).index_add_(0, rows * logits.shape[1] + cols, dp * lsn * (1 - pn))
        grad_lib = grad_lib + _row_sum(dp * s_n, rows, logits.shape[0]).unsqueeze(1)
        grad_s = grad_s.index_add_(0, cols, dp * lib_n) if ctx.has_s else None
        return grad_logits, grad_lib, grad_s, None, None, None, None


def product_bernoulli_nll_logits(
    x: torch.Tensor, logits: torch.Tensor, lib: torch.Tensor, s: torch.Tensor | None, compiled: bool = False
) -> torch.Tensor:
    """``product_bernoulli_nll(x, sigmoid(logits), lib, s)`` with the sigmoid fused in; ``compiled``
    runs the dense part through ``torch.compile`` (see ``trainer.fused``)."""
    if x.layout == torch.sparse_csr:
        rows, cols, v = _nonzeros(x)
        pos = (v > 0).to(logits.dtype)
    else:
        rows, cols = (x > 0).nonzero(as_tuple=True)
        pos = torch.ones(rows.shape, dtype=logits.dtype, device=logits.device)
    return _ProductBernoulliLogitsNLL.apply(logits.contiguous(), lib, s, rows.long(), cols.long(), pos, compiled)
