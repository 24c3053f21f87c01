"""The fused C kernels (trainer/native) against the eager code they replace.

The eager likelihoods (trainer/fused.py, trainer/distributions.py) are the reference: they are what
the float64 parity tests compare with scvi-tools. Here the float32 kernels must give the same loss and
every gradient to float32 rounding, including the awkward entries (stored zeros, counts outside the
lgamma tables, saturated probabilities at the 1e-12 gradient floor, empty rows, zero rows); the sparse
first layer must give bit-identical products. Plus what a user relies on around them: results that do
not depend on timing, a fallback that trains when no compiler or a broken library is found, and a
build cache that concurrent ranks can share.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import distributions as D
from trainer import fused, native
from trainer.native import ops
from trainer.nn import _CsrMatmul

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernels: {native.why_unavailable()}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def csr(x: torch.Tensor, stored_zero_rows: tuple[int, ...] = ()) -> torch.Tensor:
    """CSR of x with one explicitly stored zero in each of ``stored_zero_rows``' first empty column."""
    m = x.clone()
    marks = []
    for r in stored_zero_rows:
        c = int((m[r] == 0).nonzero()[0])
        m[r, c] = 1.0
        marks.append((r, c))
    out = m.to_sparse_csr()
    vals = out.values().clone()
    for r, c in marks:
        lo, hi = out.crow_indices()[r], out.crow_indices()[r + 1]
        k = int(lo + (out.col_indices()[lo:hi] == c).nonzero()[0])
        vals[k] = 0.0
    return torch.sparse_csr_tensor(out.crow_indices(), out.col_indices(), vals, x.shape, check_invariants=False)


def as64(x: torch.Tensor) -> torch.Tensor:
    return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), x.values().double(), x.shape,
                                   check_invariants=False)


def counts(g: torch.Generator, n: int, f: int, density: float) -> torch.Tensor:
    return ((torch.rand(n, f, generator=g) < density) * torch.randint(1, 5, (n, f), generator=g)).float()


def atac_case(seed: int, n: int = 23, r: int = 301):
    g = torch.Generator().manual_seed(seed)
    x = counts(g, n, r, 0.05)
    x[3] = 0.0  # a measured cell with no counts
    logits = torch.randn(n, r, generator=g) * 4
    logits[0, :5] = 60.0  # sigmoid == 1 in float32 and float64: q (1 - q) hits the 1e-12 floor
    logits[1, :5] = -200.0  # q == 0: log q clamps at -100
    x[0, :2], x[1, :2] = 1.0, 1.0  # targets 1 on saturated entries
    lib = torch.rand(n, 1, generator=g).clamp_min(0.05)
    lib[0] = 1.0
    s = torch.rand(r, generator=g).clamp_min(0.05)
    s[:5] = 1.0
    return csr(x, stored_zero_rows=(2, 5)), logits, lib, s, torch.rand(n, generator=g)


def _atac_grads(x, logits, lib, s, go, dtype, kernel):
    fresh = lambda t: t.detach().clone().to(dtype).requires_grad_()
    leaves = [fresh(logits), fresh(lib)] + ([] if s is None else [fresh(s)])
    out = kernel(x, *leaves, *([None] if s is None else []))
    (out * go.to(dtype)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_s", [True, False])
def test_atac_kernel_equals_eager(seed, with_s):
    """Native float32 vs the eager code in float64 (the reference), as close as eager float32 gets.

    Entries with q near 1 lose digits in 1 - q in any float32 code (the reference's formula), so the
    bound is relative to the eager float32 error on the same case, plus float32 rounding."""
    x, logits, lib, s, go = atac_case(seed)
    s = s if with_s else None
    eager = lambda x, p, lib, s: fused.product_bernoulli_nll(x, torch.sigmoid(p), lib, s)
    got = _atac_grads(x, logits, lib, s, go, torch.float32, ops.product_bernoulli_nll_logits)
    f32 = _atac_grads(x, logits, lib, s, go, torch.float32, eager)
    f64 = _atac_grads(as64(x), logits, lib, s, go, torch.float64, eager)
    assert got[0].dtype == torch.float32 and got[0].shape == (x.shape[0],)
    for name, a, b, c in zip(("loss", "logits", "lib", "s"), got, f32, f64):
        assert torch.isfinite(a).all(), name
        assert rel(a, c) <= 4 * rel(b, c) + 2e-6, (name, rel(a, c), rel(b, c))
    # the saturated targets-1 row: the 1e12-sized target-0 gradient must not cancel the row away
    assert rel(got[2][0], f64[2][0]) < 1e-5


def zinb_case(seed: int, n: int = 19, genes: int = 157):
    g = torch.Generator().manual_seed(seed)
    x = counts(g, n, genes, 0.35)
    x[0, :6] = torch.tensor([0.5, 8.0, 9.0, 30.0, 2.5, 1e-9])  # non-integer, table edge, beyond, tiny
    x[4] = 0.0
    mu = torch.rand(n, genes, generator=g) * 5 + 1e-4
    theta = torch.rand(genes, generator=g) * 4 + 0.01
    zi = torch.randn(n, genes, generator=g) * 3
    return csr(x, stored_zero_rows=(1, 6)), mu, theta, zi, torch.rand(n, generator=g)


def zinb_native_and_float64(x, mu, theta, zi, go):
    """(native loss, its leaves, eager float64 loss, its leaves), both backpropagated with weights go."""
    leaves = [t.clone().requires_grad_() for t in (mu, theta, zi)]
    out = ops.zinb_nll(x, *leaves)
    (out * go).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (mu, theta, zi)]
    ref = D.zinb_nll(as64(x), *ref_leaves)
    (ref * go.double()).sum().backward()
    return out, leaves, ref, ref_leaves


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zinb_kernel_equals_eager(seed):
    x, mu, theta, zi, go = zinb_case(seed)
    out, leaves, ref, ref_leaves = zinb_native_and_float64(x, mu, theta, zi, go)
    # the dense formula too (no CSR tricks at all), on the same float64 inputs
    dense = D.zinb_nll(as64(x).to_dense(), *[t.detach() for t in ref_leaves])
    assert rel(ref.detach(), dense) < 1e-12
    assert rel(out, ref) < 2e-6
    for a, b in zip(leaves, ref_leaves, strict=True):
        assert rel(a.grad, b.grad) < 5e-6


@pytest.mark.parametrize("theta_value", [1e-12, 1e-15, 1e-20])
def test_zinb_kernel_with_tiny_dispersions(theta_value):
    """The lgamma/digamma tables added log(theta + n - 1) evaluated as (theta + n) - 1: for n = 1 a theta
    below ~1e-16 became 0 (an infinite loss and theta gradient; 0.4 off at 1e-15). theta = exp(px_r)."""
    x, mu, _, zi, go = zinb_case(5)
    theta = torch.full((x.shape[1],), theta_value)
    out, leaves, ref, _ = zinb_native_and_float64(x, mu, theta, zi, go)
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in leaves)
    assert (out.double() - ref.detach()).abs().max() < 1e-3


def test_zinb_theta_as_row_vector_and_empty_batch():
    x, mu, theta, zi, _ = zinb_case(3)
    a = ops.zinb_nll(x, mu, theta.view(1, -1), zi)
    b = ops.zinb_nll(x, mu, theta, zi)
    assert torch.equal(a, b)
    empty = torch.zeros(0, 157).to_sparse_csr()
    assert ops.zinb_nll(empty, mu[:0], theta, zi[:0]).shape == (0,)
    t = theta.clone().requires_grad_()
    ops.zinb_nll(empty, mu[:0], t, zi[:0]).sum().backward()
    assert torch.equal(t.grad, torch.zeros_like(theta))  # a batch with no RNA row still yields a gradient


def test_sparse_first_layer_is_bit_identical():
    g = torch.Generator().manual_seed(0)
    x = csr(counts(g, 37, 1009, 0.04), stored_zero_rows=(0,))
    w = torch.randn(1009, 61, generator=g)
    grad = torch.randn(37, 61, generator=g)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    a, b = _CsrMatmul.apply(x, w1), ops.csr_matmul(x, w2)
    a.backward(grad)
    b.backward(grad)
    assert torch.equal(a, b) and torch.equal(w1.grad, w2.grad)


def test_csr_to_dense_equals_torch():
    g = torch.Generator().manual_seed(3)
    dense = counts(g, 29, 517, 0.35)
    dense[4] = 0.0  # a row with no entries
    x = csr(dense, stored_zero_rows=(7,))
    got = ops.csr_to_dense(x)
    assert got.dtype == torch.float32 and torch.equal(got, x.to_dense()) and torch.equal(got, dense)
    empty = dense[:0].to_sparse_csr()
    assert ops.csr_to_dense(empty).shape == (0, 517)
    # what the kernel does not take goes to torch: float64 values stay float64
    assert torch.equal(ops.csr_to_dense(as64(x)), as64(x).to_dense())


def test_csr_to_dense_sums_duplicate_entries_as_torch():
    """A CSR with a repeated (row, col) means the sum (scipy, torch); the C scatter kept the last one."""
    x = torch.sparse_csr_tensor(torch.tensor([0, 3, 4]), torch.tensor([1, 1, 4, 0]),
                                torch.tensor([2.0, 3.0, 1.0, 7.0]), size=(2, 6))
    assert torch.equal(ops.csr_to_dense(x), x.to_dense()) and ops.csr_to_dense(x)[0, 1] == 5.0


def test_eager_csr_likelihoods_take_non_contiguous_inputs():
    """Their backward writes through flat views: a column-major mu / zi / logits raised 'view size is not
    compatible' on the eager path (no compiler, float64, MVA_NATIVE_KERNELS=0) while the native one ran."""
    x, mu, theta, zi, _ = zinb_case(2)
    cm = [t.t().contiguous().t().requires_grad_() for t in (mu, zi)]  # same values, column-major strides
    out = D.zinb_nll(x, cm[0], theta, cm[1])
    out.sum().backward()
    ref = [t.clone().requires_grad_() for t in (mu, zi)]
    D.zinb_nll(x, ref[0], theta, ref[1]).sum().backward()
    for a, b in zip(cm, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    logits = torch.randn(x.shape[1], x.shape[0]).t().requires_grad_()
    fused.product_bernoulli_nll_logits(x, logits, torch.ones(x.shape[0], 1), None).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_thread_count_changes_nothing_it_should_not():
    """Per-cell outputs never depend on the thread count; row sums (region factors, dispersion) are
    added in a fixed thread order: the same threads give the same bits every time."""
    x, logits, lib, s, go = atac_case(0, n=40)
    before = torch.get_num_threads()

    def run():
        leaves = [t.clone().requires_grad_() for t in (logits, lib, s)]
        out = ops.product_bernoulli_nll_logits(x, *leaves)
        (out * go).sum().backward()
        w = torch.randn(301, 7, generator=torch.Generator().manual_seed(1)).requires_grad_()
        h = ops.csr_matmul(x, w)
        h.sum().backward()
        return [out.detach(), h.detach(), w.grad] + [t.grad for t in leaves]

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two, again = run(), run()
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(two, again, strict=True))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and torch.equal(one[2], two[2])
    assert all(rel(a, b) < 1e-6 for a, b in zip(one, two, strict=True))


def test_module_loss_and_gradients_native_vs_eager():
    """The whole objective in float32 on CSR counts: native kernels vs eager code, same weights."""
    from trainer.module import MultiVAE

    g = torch.Generator().manual_seed(0)
    n = 24
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[12:18, 1] = False
    mask[18:, 0] = False
    batch = {
        "rna": csr(counts(g, n, 70, 0.3) * mask[:, :1]), "atac": csr(counts(g, n, 150, 0.05) * mask[:, 1:]),
        "mask": mask, "batch": torch.randint(0, 2, (n,), generator=g),
        "cat_covs": torch.zeros(n, 0, dtype=torch.long), "cont_covs": torch.zeros(n, 0), "index": torch.arange(n),
    }
    torch.manual_seed(0)
    fast = MultiVAE(70, 150, n_batch=2, dropout_rate=0.0)
    slow = MultiVAE(70, 150, n_batch=2, dropout_rate=0.0, native_kernels=False)
    slow.load_state_dict(fast.state_dict())
    assert fast.atac_encoder.native_kernels and not slow.atac_encoder.native_kernels
    eps = torch.randn(n, fast.n_latent, generator=g)
    outs = []
    for m in (fast, slow):
        out = m.loss(batch, kl_weight=0.7, eps=eps)
        out.loss.backward()
        outs.append(out)
    assert outs[0].outputs["p"] is None and outs[1].outputs["p"] is not None
    for term in ("loss", "recon_rna", "recon_atac", "kl", "penalty"):
        assert rel(getattr(outs[0], term).detach(), getattr(outs[1], term).detach()) < 1e-5, term
    for (name, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters(), strict=True):
        assert rel(a.grad, b.grad) < 1e-4, name


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=ROOT, check=False, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


STEP = """
import torch, warnings
from trainer import native
from trainer.module import MultiVAE
x = (torch.rand(8, 30) < 0.3).float()
b = {"rna": x[:, :20].to_sparse_csr(), "atac": x[:, 20:].to_sparse_csr(), "mask": torch.ones(8, 2, dtype=torch.bool),
     "batch": torch.zeros(8, dtype=torch.long), "cat_covs": torch.zeros(8, 0, dtype=torch.long),
     "cont_covs": torch.zeros(8, 0), "index": torch.arange(8)}
with torch.inference_mode():  # first use from inside inference mode (an inference job) must still self-check
    native.library()
out = MultiVAE(20, 10).loss(b)
out.loss.backward()
print("LIB", native.library() is not None, "P", out.outputs["p"] is None, "WHY", native.why_unavailable())
"""


def test_switched_off_by_environment():
    res = _python(STEP, {"MVA_NATIVE_KERNELS": "0"})
    assert res.returncode == 0, res.stderr
    assert "LIB False P False WHY MVA_NATIVE_KERNELS=0" in res.stdout
    assert "unavailable" not in res.stderr  # switching off is not worth a warning


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    res = _python(STEP, {"CC": "false", "MVA_KERNEL_CACHE": str(tmp_path / "cache"), "PATH": "/nonexistent"})
    assert res.returncode == 0, res.stderr
    assert "LIB False P False" in res.stdout
    assert res.stderr.count("native CPU kernels unavailable") == 1


def test_first_use_inside_inference_mode_loads(tmp_path):
    res = _python(STEP, {"MVA_KERNEL_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert "LIB True P True WHY None" in res.stdout


def test_a_wrong_library_is_refused_by_the_self_check(tmp_path):
    """A kernel that computes something else (here: a sign error in the ATAC forward) never trains."""
    bad = tmp_path / "kernels.c"
    src = native.SOURCE.read_text()
    assert src.count("out[i] = -acc;") >= 2
    bad.write_text(src.replace("out[i] = -acc;", "out[i] = acc;", 1))
    code = f"import pathlib; from trainer import native; native.SOURCE = pathlib.Path({str(bad)!r})\n" + STEP
    res = _python(code, {"MVA_KERNEL_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert "LIB False P False" in res.stdout and "self-check" in res.stdout


def test_concurrent_first_builds_share_one_cache(tmp_path):
    """Ranks starting together on a fresh machine each build, then rename atomically: all load."""
    cache = tmp_path / "cache"
    code = "from trainer import native; print('OK', native.library() is not None)"
    env = {**os.environ, "MVA_KERNEL_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("OK True" in o for o, _ in outs), outs
    built = list(cache.glob("mva_kernels_*.so"))
    assert len(built) == 1 and not list(cache.glob(".*.tmp"))


def test_a_misspelt_cc_is_said_and_the_default_compiler_used(tmp_path):
    res = _python(STEP, {"CC": "gcc-typo-xyz", "MVA_KERNEL_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert "LIB True" in res.stdout and "CC='gcc-typo-xyz' is not an executable on PATH" in res.stderr
