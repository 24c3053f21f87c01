"""Per-cell negative log-likelihoods (summed over features) for dense or sparse-CSR count matrices.

Formulas follow the reference exactly (spec §3.1, eps = 1e-8, torch BCE convention with logs clamped
at -100), so losses match scvi-tools to float precision. For sparse input the terms are split into a
part evaluated on every entry as if the count were zero, plus a correction evaluated only on the
stored (nonzero) entries; the count matrix is never densified and the expensive per-entry terms
(lgamma, log mu) are evaluated only where counts are nonzero.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from trainer import fused

EPS = 1e-8


def _nonzeros(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, col, value) of the stored entries of a CSR matrix."""
    crow = x.crow_indices()
    # output_size given: no device->host sync on GPU
    rows = torch.repeat_interleave(
        torch.arange(x.shape[0], device=x.device), crow[1:] - crow[:-1], output_size=x.values().numel()
    )
    return rows, x.col_indices(), x.values()


def _row_sum(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)


def row_totals(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums of a dense or CSR matrix (torch.sparse.sum does not accept CSR)."""
    if x.layout != torch.sparse_csr:
        return x.sum(-1)
    rows, _, v = _nonzeros(x)
    return _row_sum(v, rows, x.shape[0])


def _theta_2d(theta: torch.Tensor) -> torch.Tensor:
    return theta.view(1, -1) if theta.dim() == 1 else theta


def _gather(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Entries of a (B, F) or broadcastable (1, F) tensor at (rows, cols).

    Flat ``index_select`` rather than ``t[rows, cols]``: its backward is an ``index_add_`` instead of
    the much slower accumulating ``index_put_`` (measured ~2 ms per step at batch 128 x 2,000 genes).
    """
    if t.shape[0] == 1:
        return t.reshape(-1).index_select(0, cols)
    return t.reshape(-1).index_select(0, rows * t.shape[1] + cols)


def _lgamma_at(theta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """lgamma(theta) at the stored entries. A per-gene theta (1, G) is evaluated once per gene and then
    gathered (same values; lgamma and its digamma backward are ~15 ns per element on one CPU core, and
    there are ~30x more nonzeros than genes); a per-cell theta (B, G) is gathered first."""
    if theta.shape[0] == 1:
        return _gather(torch.lgamma(theta), rows, cols)
    return torch.lgamma(_gather(theta, rows, cols))


# Counts 0..TABLE_MAX (most scRNA nonzeros: 1-3) get lgamma / digamma from small per-gene tables.
TABLE_MAX = 8


class _Counts:
    """Stored count values ``v`` of a CSR batch, indexed for the lgamma tables (CPU only).

    On one CPU core torch's lgamma costs ~10 ns and digamma ~40 ns per element (scalar libm calls),
    and the ZINB/NB terms need lgamma(v + theta), its digamma backward and lgamma(v + 1) at every
    nonzero (~70k per step at the benchmark sizes: ~4 ms). With integer counts <= TABLE_MAX these
    are values at the same float arguments theta_g + n, n = 0..TABLE_MAX, so they are evaluated once
    per (gene, n) and gathered: bit-identical (same libm call on the same argument), and the rest
    (non-integer or larger counts) is evaluated directly.
    """

    def __init__(self, v: torch.Tensor):
        self.v = v
        vi = v.to(torch.long)  # truncates; entries that are not small integers are redone below
        ok = (vi.to(v.dtype) == v) & (v >= 0) & (v <= TABLE_MAX)
        self.col = vi.clamp_(0, TABLE_MAX)  # column of the (., TABLE_MAX + 1) tables
        self.far = None if bool(ok.all()) else (~ok).nonzero().squeeze(1)

    def lgamma_plus_one(self) -> torch.Tensor:
        """lgamma(v + 1)."""
        n = torch.arange(TABLE_MAX + 1, dtype=self.v.dtype, device=self.v.device)
        out = torch.lgamma(n + 1).index_select(0, self.col)
        if self.far is not None:
            out[self.far] = torch.lgamma(self.v[self.far] + 1)
        return out


class _LgammaShifted(torch.autograd.Function):
    """lgamma(v + theta[cols]) at the stored entries for a per-gene theta (G,), from a (G, n) table
    of lgamma(theta_g + n) (forward) and digamma(theta_g + n) (backward); see ``_Counts``."""

    @staticmethod
    def forward(ctx, theta, counts: _Counts, cols):
        n = torch.arange(TABLE_MAX + 1, dtype=theta.dtype, device=theta.device)
        arg = theta.unsqueeze(1) + n  # (G, n): the same float sums as v + theta at the entries
        flat = cols * (TABLE_MAX + 1) + counts.col
        out = torch.lgamma(arg).view(-1).index_select(0, flat)
        far = counts.far
        if far is not None:
            out[far] = torch.lgamma(counts.v[far] + theta.index_select(0, cols[far]))
        ctx.save_for_backward(theta, arg, flat, cols)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad):
        theta, arg, flat, cols = ctx.saved_tensors
        dig = torch.digamma(arg).view(-1).index_select(0, flat)
        far = ctx.counts.far
        if far is not None:
            dig[far] = torch.digamma(ctx.counts.v[far] + theta.index_select(0, cols[far]))
        grad_theta = torch.zeros_like(theta).index_add_(0, cols, grad * dig)
        return grad_theta, None, None


def _lgamma_terms(theta: torch.Tensor, v: torch.Tensor, rows, cols) -> tuple[torch.Tensor, torch.Tensor]:
    """(lgamma(v + theta), lgamma(v + 1)) at the stored entries; theta (1, G) or (B, G)."""
    if v.device.type != "cpu":  # elementwise lgamma/digamma are cheap on accelerators
        return torch.lgamma(v + _gather(theta, rows, cols)), torch.lgamma(v + 1)
    counts = _Counts(v)
    if theta.shape[0] == 1:
        shifted = _LgammaShifted.apply(theta.reshape(-1), counts, cols)
    else:
        shifted = torch.lgamma(v + _gather(theta, rows, cols))
    return shifted, counts.lgamma_plus_one()


def _zinb_nonzero(x, mu, lgamma_x_theta, lgamma_theta, lgamma_x_1, softplus_pi, pi_theta_log, log_theta_mu_eps):
    """log ZINB(x) for x > 0, elementwise: shared by the dense path and the CSR path (on gathered nonzeros)."""
    return (
        -softplus_pi
        + pi_theta_log
        + x * (torch.log(mu + EPS) - log_theta_mu_eps)
        + lgamma_x_theta
        - lgamma_theta
        - lgamma_x_1
    )


def zinb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """-sum_g log ZINB(x | mu, theta, pi) per cell. theta: (G,) or (B, G)."""
    theta = _theta_2d(theta)
    softplus_pi = F.softplus(-zi_logits)
    log_theta_mu_eps = torch.log(theta + mu + EPS)
    pi_theta_log = -zi_logits + theta * (torch.log(theta + EPS) - log_theta_mu_eps)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    if x.layout != torch.sparse_csr:
        case_non_zero = _zinb_nonzero(
            x, mu, torch.lgamma(x + theta), torch.lgamma(theta), torch.lgamma(x + 1),
            softplus_pi, pi_theta_log, log_theta_mu_eps,
        )
        return -((x < EPS).to(mu.dtype) * case_zero + (x > EPS).to(mu.dtype) * case_non_zero).sum(-1)
    rows, cols, v = _nonzeros(x)
    v = v.to(mu.dtype)
    m = _gather(mu, rows, cols)
    spi = _gather(softplus_pi, rows, cols)
    ptl = _gather(pi_theta_log, rows, cols)
    lmt = _gather(log_theta_mu_eps, rows, cols)
    lg_shift, lg_count = _lgamma_terms(theta, v, rows, cols)
    nz = _zinb_nonzero(v, m, lg_shift, _lgamma_at(theta, rows, cols), lg_count, spi, ptl, lmt)
    # every entry was counted as a zero; swap in the nonzero term where the stored value is > eps
    corr = (v > EPS).to(mu.dtype) * nz - (v >= EPS).to(mu.dtype) * _gather(case_zero, rows, cols)
    return -(case_zero.sum(-1) + _row_sum(corr, rows, x.shape[0]))


def nb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """-sum_g log NB(x | mu, theta) per cell (reference parametrisation)."""
    theta = _theta_2d(theta)
    log_theta_mu_eps = torch.log(theta + mu + EPS)
    zero_term = theta * (torch.log(theta + EPS) - log_theta_mu_eps)
    if x.layout != torch.sparse_csr:
        res = (
            zero_term
            + x * (torch.log(mu + EPS) - log_theta_mu_eps)
            + torch.lgamma(x + theta)
            - torch.lgamma(theta)
            - torch.lgamma(x + 1)
        )
        return -res.sum(-1)
    rows, cols, v = _nonzeros(x)
    v = v.to(mu.dtype)
    lg_shift, lg_count = _lgamma_terms(theta, v, rows, cols)
    nz = (
        v * (torch.log(_gather(mu, rows, cols) + EPS) - _gather(log_theta_mu_eps, rows, cols))
        + lg_shift
        - _lgamma_at(theta, rows, cols)
        - lg_count
    )
    return -(zero_term.sum(-1) + _row_sum(nz, rows, x.shape[0]))


def poisson_nll(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """-sum_g log Poisson(x | mu) per cell (x log mu - mu - lgamma(x + 1), as torch's Poisson)."""
    if x.layout != torch.sparse_csr:
        return -(torch.xlogy(x, mu) - mu - torch.lgamma(x + 1)).sum(-1)
    rows, cols, v = _nonzeros(x)
    v = v.to(mu.dtype)
    lg_count = _Counts(v).lgamma_plus_one() if v.device.type == "cpu" else torch.lgamma(v + 1)
    nz = torch.xlogy(v, _gather(mu, rows, cols)) - lg_count
    return -(-mu.sum(-1) + _row_sum(nz, rows, x.shape[0]))


def bernoulli_nll(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_j BCE(q, 1[x > 0]) per cell with torch's convention (logs clamped at -100).

    Sparse form: sum over all entries of -log(1 - q), plus over stored nonzeros of
    [-log q + log(1 - q)]; identical value and gradient to the dense BCE.
    """
    if x.layout != torch.sparse_csr:
        return F.binary_cross_entropy(q, (x > 0).to(q.dtype), reduction="none").sum(-1)
    log_1mq = torch.clamp(torch.log(1 - q), min=-100)
    rows, cols, v = _nonzeros(x)
    qn = _gather(q, rows, cols)
    corr = (v > 0).to(q.dtype) * (torch.clamp(torch.log(qn), min=-100) - _gather(log_1mq, rows, cols))
    return -(log_1mq.sum(-1) + _row_sum(corr, rows, x.shape[0]))


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
        den = torch.rsub(q, 1).mul_(q).clamp_min_(fused.BCE_DEN_MIN)
        qn, dn = _gather(q, rows, cols), _gather(den, rows, cols)
        g = torch.div(q, den, out=den)  # target 0 everywhere ...
        g.view(-1).index_copy_(0, rows * g.shape[1] + cols, (qn - pos) / dn)  # ... target 1 where x > 0
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
    return _ProductBernoulliNLL.apply(p, lib, s, rows, cols, pos)


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
        dense = fused.atac_forward(logits, lib, s_, compiled=compiled)
        qn = torch.sigmoid(_gather(logits, rows, cols)) * (lib.reshape(-1)[rows] * s_[cols])
        corr = (torch.log(qn).clamp_min_(-100) - torch.log(1 - qn).clamp_min_(-100)) * pos
        ctx.save_for_backward(logits, lib, s_, rows, cols, pos)
        ctx.has_s, ctx.compiled = s is not None, compiled
        return -(dense + _row_sum(corr, rows, logits.shape[0]))

    @staticmethod
    def backward(ctx, grad_out):
        logits, lib, s, rows, cols, pos = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_logits, grad_lib, grad_s = fused.atac_backward(logits, lib, s, grad_out, compiled=ctx.compiled)
        # targets 1: dBCE/dq = (q - 1) / den instead of q / den, i.e. add -pos / den at the nonzeros
        pn = torch.sigmoid(_gather(logits, rows, cols))
        lib_n, s_n = lib.reshape(-1)[rows], s[cols]
        lsn = lib_n * s_n
        qn = pn * lsn
        delta = -pos / torch.clamp(qn * (1 - qn), min=fused.BCE_DEN_MIN) * grad_out[rows]
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
    return _ProductBernoulliLogitsNLL.apply(logits, lib, s, rows.long(), cols.long(), pos, compiled)
