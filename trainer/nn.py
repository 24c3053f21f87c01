"""Building blocks of the MultiVI module: fully-connected stacks with covariate injection.

The layer order and sizes follow the reference (scvi-tools ``FCLayers``; spec §2.2) so weights can be
copied one-to-one between the two implementations (``trainer/reference.py``):
Linear -> [BatchNorm1d(mom 0.01, eps 1e-3)] -> [LayerNorm(no affine)] -> activation -> [Dropout].

Two deliberate differences in *how* (never *what*) is computed:

* covariates are not concatenated to the input; the first Linear's weight is split into an input part
  and a covariate part (``x @ W_x.T + cov @ W_c.T + b``). This lets the input part be a sparse CSR
  matrix (counts) without densifying it, and lets two stacks that read the same counts share one
  matmul (``input_matmul`` of the fused weights, see ``EncoderPair``).
* one-hot covariates are built once per forward by the module and passed as one dense tensor.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from trainer.native import ops as native_ops

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}


# Above this fraction of stored entries a CSR matmul (and its backward) is slower than densifying the
# block on the device and using BLAS (measured on one CPU thread: RNA at 35 % density is ~2.5x faster
# dense; ATAC at 3.5 % is ~1.5x faster sparse).
DENSIFY_ABOVE = 0.10


def multiplies_densely(x: torch.Tensor) -> bool:
    """Whether a first layer multiplies ``x`` as a dense matrix (dense, or CSR above DENSIFY_ABOVE):
    then every row costs a full GEMM row, empty or not (so skipping rows pays)."""
    return x.layout != torch.sparse_csr or x.values().numel() > DENSIFY_ABOVE * x.shape[0] * x.shape[1]


def input_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for dense or sparse-CSR ``x``; gradients flow to ``weight`` in both cases."""
    if x.layout == torch.sparse_csr:
        if x.values().numel() <= DENSIFY_ABOVE * x.shape[0] * x.shape[1]:
            return torch.sparse.mm(x, weight.t())
        x = x.to_dense()  # on x's device; the host never densifies
    return x @ weight.t()


def _bag_matmul(indices, offsets, values, table):
    """``CSR @ table`` as a weighted ``embedding_bag`` sum: row i = sum_k values_k * table[indices_k].

    One fused gather-scale-add kernel (fbgemm on CPU); torch's CSR ``sparse.mm`` is ~2-5x slower here.
    """
    if indices.dtype != offsets.dtype:
        indices, offsets = indices.long(), offsets.long()
    weights = values.to(table.dtype)
    return F.embedding_bag(
        indices, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
    )


class _CsrMatmul(torch.autograd.Function):
    """``x @ w`` for CSR ``x`` (no gradient) and dense ``w`` (n_in, n_out).

    Forward and backward are both weighted embedding-bag sums: the weight gradient x^T @ grad uses the
    transposed structure (entries sorted by column, stable; offsets from column counts), built
    without a device sync. torch's generic ``sparse.mm`` backward instead zero-fills and copies a dense
    (n_in, n_out) buffer around a slow CSR product (~5 ms per step at 10^4 regions vs ~2 ms this way).
    """

    @staticmethod
    def forward(ctx, x, w):
        ctx.x = x
        return _bag_matmul(x.col_indices(), x.crow_indices(), x.values(), w)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.x
        crow, cols, vals = x.crow_indices(), x.col_indices(), x.values()
        rows = torch.repeat_interleave(
            torch.arange(x.shape[0], device=grad.device), crow[1:] - crow[:-1], output_size=vals.numel()
        )
        # int32 sorts ~2x faster than int64; counts + cumsum beat searchsorted ~10x and never sync
        _, perm = torch.sort(cols.int() if x.shape[1] < 2**31 else cols, stable=True)
        counts = torch.zeros(x.shape[1] + 1, dtype=torch.long, device=grad.device)
        offsets = counts.index_add_(0, cols.long() + 1, torch.ones_like(cols, dtype=torch.long)).cumsum_(0)
        return None, _bag_matmul(rows[perm], offsets, vals[perm], grad.contiguous())


def input_matmul_t(x: torch.Tensor, weight_t: torch.Tensor, native: bool = False) -> torch.Tensor:
    """``x @ weight_t`` with ``weight_t`` stored (n_in, n_out): no transpose copy for sparse x.

    ``native``: a sparse product on the CPU uses the C kernel of ``trainer/native`` where it loads
    (the same sums in the same order as ``_CsrMatmul``, ~20 % less time: it prefetches the cold
    weight rows and writes the weight gradient once).
    """
    if x.layout == torch.sparse_csr:
        if x.values().numel() <= DENSIFY_ABOVE * x.shape[0] * x.shape[1]:
            if native and native_ops.available(x, weight_t):
                return native_ops.csr_matmul(x, weight_t)
            return _CsrMatmul.apply(x, weight_t)
        x = native_ops.csr_to_dense(x) if native else x.to_dense()
    return x @ weight_t


REDUCED_FLOATS = (torch.bfloat16, torch.float16)


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype everything after a network runs in: float32 for bf16/fp16 weights (DeepSpeed's
    all-bf16 modules), the weights' own dtype otherwise (float32, float64)."""
    return torch.float32 if weight_dtype in REDUCED_FLOATS else weight_dtype


def head(linear: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """An output head ``linear(h)``, returned in ``compute_dtype`` of the head's weights.

    Under autocast (bf16/fp16) the Linear runs in the low precision, and under DeepSpeed bf16 the
    weights themselves are bf16; either way what follows a head (exp, softmax, the likelihoods and
    their sums over 10^4-10^5 features, the KL) must not be: the cast brings the output to float32
    before any of it (a no-op for float32 / float64 modules outside autocast).
    """
    out = linear(h)
    want = compute_dtype(linear.weight.dtype)
    return out if out.dtype == want else out.to(want)


def one_hot_covariates(
    codes: list[torch.Tensor], n_cats: list[int], dtype: torch.dtype
) -> torch.Tensor | None:
    """Concatenate one-hot encodings of categorical codes; categories with one level are dropped.

    Dropping single-level covariates mirrors the reference (they carry no information), which keeps
    the first-layer widths identical so weights map 1:1.
    """
    parts = [
        F.one_hot(c.reshape(-1).long(), n).to(dtype) for c, n in zip(codes, n_cats, strict=True) if n > 1
    ]
    if not parts:
        return None
    return torch.cat(parts, dim=-1)


def covariate_width(n_cats: list[int]) -> int:
    return sum(n for n in n_cats if n > 1)


class FCStack(nn.Module):
    """``n_layers`` fully-connected blocks; covariates enter block 0 and, if ``inject_deep``, every block.

    ``n_in`` counts only the main input (counts, or latent + continuous covariates); the covariate
    columns (width ``n_cov``) are appended to the Linear weights of the blocks that receive them,
    in the same column order the reference uses (input first, then one-hots).
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_layers: int,
        n_cov: int = 0,
        inject_deep: bool = False,
        n_extra: int = 0,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        layer_norm: bool = False,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_in = n_in
        self.n_cov = n_cov
        self.n_extra = n_extra
        self.inject = [i == 0 or inject_deep for i in range(n_layers)]
        dims = [n_in + n_extra] + [n_hidden] * n_layers
        with warnings.catch_warnings():  # a fused encoder's first Linear may hold only the bias
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.linears = nn.ModuleList(
                nn.Linear(dims[i] + (n_cov if self.inject[i] else 0), dims[i + 1]) for i in range(n_layers)
            )
        if self.linears[0].in_features == 0:
            # no weight at all rather than an unused (H, 0) parameter (DDP would wait for its gradient)
            self.linears[0].register_parameter("weight", None)
        self.batch_norms = (
            nn.ModuleList(nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3) for _ in range(n_layers))
            if batch_norm
            else None
        )
        self.layer_norm = layer_norm
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def _block(self, i: int, pre: torch.Tensor) -> torch.Tensor:
        if self.batch_norms is not None:
            pre = self.batch_norms[i](pre)
        if self.layer_norm:
            pre = F.layer_norm(pre, pre.shape[-1:])
        h = self.act(pre)
        if self.dropout is not None:
            h = self.dropout(h)
        return h

    @staticmethod
    def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(
        self,
        x: torch.Tensor | None,
        cov: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        x_part: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the stack.

        ``cov``: one-hot covariates (every injected block); ``extra``: dense columns that enter block 0
        only, right after the input (continuous covariates of an encoder, as in the reference);
        ``x_part``: precomputed ``x @ W_x.T`` (fused first layer), then ``x`` is unused.
        """
        lin0 = self.linears[0]
        side = [t for t in (extra if self.n_extra else None, cov if self.n_cov else None) if t is not None]
        if x_part is not None:
            # fused first layer (n_in = 0: the weight holds only covariate columns, the slice is the
            # whole weight); the covariate product accumulates into x_part in one addmm
            w = lin0.weight if self.n_in == 0 else lin0.weight[:, self.n_in :]
            pre = x_part if not side else torch.addmm(x_part, self._cat(side), w.t())
            pre = pre + lin0.bias
        elif x is not None and x.layout != torch.sparse_csr:
            # dense input: one Linear over [x, extra, cov] as the reference computes it (fewer autograd
            # nodes than x @ W_x + cov @ W_c + b with two weight slices)
            inp = self._cat([x, *side])
            # a float32 latent entering bf16 weights (DeepSpeed bf16: the heads' outputs are float32)
            inp = inp if inp.dtype == lin0.weight.dtype else inp.to(lin0.weight.dtype)
            pre = F.linear(inp, lin0.weight, lin0.bias)
        else:
            pre = input_matmul(x, lin0.weight[:, : self.n_in])
            if side:
                pre = pre + self._cat(side) @ lin0.weight[:, self.n_in :].t()
            pre = pre + lin0.bias
        h = self._block(0, pre)
        for i in range(1, len(self.linears)):
            lin = self.linears[i]
            if self.inject[i] and self.n_cov and cov is not None:
                h = torch.cat([h, cov], dim=-1)
            h = self._block(i, lin(h))
        return h


_LIBRARY_VAR_EPS = 1e-4


class EncoderPair(nn.Module):
    """The two networks that read one modality's counts: the z-encoder and the library network.

    Both first layers multiply the same (possibly sparse) count matrix, so their input weights live in
    one parameter ``input_weight`` of shape (n_in, k * n_hidden), k = 2 (or 1 without a library
    network), laid out so that ``x @ input_weight`` needs no transpose copy and no concatenation per
    step (the dominant cost of the encoders at 10^4-10^5 regions). Columns [0, H) are the z-encoder's,
    [H, 2H) the library network's; the stacks' own first Linear keeps only the covariate columns and
    the bias. ``trainer/reference.py`` maps this layout to the reference's two Linear weights.
    ``library_head``: ``"leaky_relu"`` (RNA, log-library), ``"sigmoid"`` (ATAC, factor in (0, 1)),
    ``"lognormal"`` (RNA, ``model.rna_library=lognormal``: the mean and variance of a Normal posterior of
    the log-library, scvi-tools ``VAE``'s library encoder with ``use_observed_lib_size=False``: linear mean,
    variance exp(.) + 1e-4) or ``None`` (size factors given: no library network).
    """

    def __init__(
        self,
        n_in: int,
        n_latent: int,
        n_hidden: int,
        n_layers: int,
        n_cov: int,
        n_extra: int,
        z_inject_deep: bool,
        lib_inject_deep: bool,
        dropout: float,
        batch_norm: bool,
        layer_norm: bool,
        library_head: str | None,
    ):
        super().__init__()
        common = {
            "n_cov": n_cov,
            "n_extra": n_extra,
            "activation": "leaky_relu",
            "batch_norm": batch_norm,
            "layer_norm": layer_norm,
        }
        self.z_stack = FCStack(0, n_hidden, n_layers, inject_deep=z_inject_deep, dropout=dropout, **common)
        self.mean = nn.Linear(n_hidden, n_latent)
        self.var = nn.Linear(n_hidden, n_latent)
        self.library_head = library_head
        stacks = [self.z_stack]
        if library_head is not None:
            self.lib_stack = FCStack(
                0, n_hidden, n_layers, inject_deep=lib_inject_deep, dropout=0.0, **common
            )
            self.lib_out = nn.Linear(n_hidden, 1)
            # the log-variance head of the lognormal library (its own Linear: lib_out keeps the reference's
            # name and shape in both modes)
            self.lib_var = nn.Linear(n_hidden, 1) if library_head == "lognormal" else None
            stacks.append(self.lib_stack)
        self.n_hidden, self.n_in = n_hidden, n_in
        self.native_kernels = False  # set by the module (MultiVAE.native_kernels)
        self.input_weight = nn.Parameter(torch.empty(n_in, len(stacks) * n_hidden))
        # nn.Linear's default init for the *whole* first layer (fan-in = counts + covariates)
        bound = 1.0 / math.sqrt(n_in + n_extra + n_cov)
        with torch.no_grad():
            self.input_weight.uniform_(-bound, bound)
            for stack in stacks:
                if stack.linears[0].weight is not None:
                    stack.linears[0].weight.uniform_(-bound, bound)
                stack.linears[0].bias.uniform_(-bound, bound)

    def forward(
        self, x: torch.Tensor, cov: torch.Tensor | None, extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return (mean, variance, library) with variance = exp(.) (var_eps = 0, as the reference). The
        library is (B, 1), or (B, 2) = [posterior mean, posterior variance] of the log-library (lognormal)."""
        w = self.input_weight
        x = x if x.dtype == w.dtype else x.to(w.dtype)  # float32 counts into bf16 weights (DeepSpeed bf16)
        both = input_matmul_t(x, w, self.native_kernels)
        # split (not two slices): its backward is one concatenation, not two zero-filled full-size copies
        parts = both.split(self.n_hidden, dim=1)
        h = self.z_stack(None, cov, extra, x_part=parts[0])
        mean, var = head(self.mean, h), torch.exp(head(self.var, h))
        if self.library_head is None:
            return mean, var, None
        h_lib = self.lib_stack(None, cov, extra, x_part=parts[1])
        lib = head(self.lib_out, h_lib)
        if self.library_head == "lognormal":
            # var_eps 1e-4 as scvi-tools' Encoder: a posterior variance that cannot collapse to 0 (log 0 in the KL)
            return mean, var, torch.cat([lib, torch.exp(head(self.lib_var, h_lib)) + _LIBRARY_VAR_EPS], dim=1)
        lib = F.leaky_relu(lib) if self.library_head == "leaky_relu" else torch.sigmoid(lib)
        return mean, var, lib


def select_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (sorted int64 indices) of a dense or sparse-CSR matrix, CSR kept CSR.

    torch has no CSR ``index_select``; this gathers the selected rows' stored entries directly
    (crow differences -> counts, one ``repeat_interleave`` for their positions), never densifying.
    Index dtypes (int32 from the loader, or int64) are kept.
    """
    if x.layout != torch.sparse_csr:
        return x.index_select(0, rows)
    crow = x.crow_indices()
    start = crow[:-1].index_select(0, rows).long()
    counts = crow[1:].index_select(0, rows).long() - start
    new_crow = torch.zeros(rows.numel() + 1, dtype=torch.long, device=x.device)
    torch.cumsum(counts, 0, out=new_crow[1:])
    nnz = int(new_crow[-1])  # one host sync: the selected entry count sizes every buffer below
    if nnz == x.values().numel():
        # every stored entry is in a selected row (the rows left out are empty, as an unmeasured
        # modality's rows are): the entries keep their order, only the row pointers change
        return torch.sparse_csr_tensor(
            new_crow.to(crow.dtype),
            x.col_indices(),
            x.values(),
            (rows.numel(), x.shape[1]),
            check_invariants=False,
        )
    # entry k of the result (in row r) is entry start[r] + (k - new_crow[r]) of the input
    pos = torch.repeat_interleave(start - new_crow[:-1], counts, output_size=nnz)
    pos += torch.arange(nnz, device=x.device)
    return torch.sparse_csr_tensor(
        new_crow.to(crow.dtype),
        x.col_indices().index_select(0, pos),
        x.values().index_select(0, pos),
        (rows.numel(), x.shape[1]),
        check_invariants=False,  # built from a valid CSR: nothing to check, and no per-call warning
    )
