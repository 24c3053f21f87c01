"""Dense elementwise kernels of the ATAC likelihood, optionally compiled with ``torch.compile``.

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
