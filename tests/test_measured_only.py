"""Computing only what the loss can see changes nothing the loss can see (float64, <= 1e-12 relative).

``MultiVAE.loss`` decodes RNA only for RNA-measured cells and ATAC only for ATAC-measured cells, and
``inference(measured_only=True)`` encodes each modality only where it is measured
(``skip_unmeasured`` / ``skip_unmeasured_encoders``). Here the same module, weights, batch and noise
run with both switched on and both switched off (the reference's full computation), and the loss,
every per-cell term and every parameter gradient must agree, for dense and sparse-CSR input, on real
PBMC cells (6 paired, 3 RNA-only, 3 ATAC-only), and on batches where one modality is absent
entirely. Run: ``.venv/bin/python -m pytest tests/test_measured_only.py -q``
"""

from __future__ import annotations

import pytest
import torch

from data import keys
from tests.test_parity import load_pbmc_counts, make_batch, randomize
from trainer.module import MultiVAE
from trainer.nn import select_rows

pytestmark = pytest.mark.filterwarnings(
    "ignore:Sparse CSR tensor support is in beta", "ignore:Initializing zero-element tensors"
)

RTOL = 1e-12
TERMS = ("loss", "recon_rna", "recon_atac", "kl", "penalty", "qz_m", "qz_v", "z")


@pytest.fixture
def pbmc_counts():
    return load_pbmc_counts()


def to_csr(batch: dict, int32: bool = True) -> dict:
    """The loader's format: CSR with int32 indices."""
    out = dict(batch)
    for key in (keys.RNA, keys.ATAC):
        x = batch[key].to_sparse_csr()
        if int32:
            x = torch.sparse_csr_tensor(
                x.crow_indices().int(), x.col_indices().int(), x.values(), x.shape, check_invariants=True
            )
        out[key] = x
    return out


def run(module: MultiVAE, batch: dict, eps: torch.Tensor, skip: bool):
    module.skip_unmeasured = module.skip_unmeasured_encoders = skip
    module.zero_grad(set_to_none=True)
    out = module.loss(batch, kl_weight=0.7, eps=eps)
    out.loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.numel()}
    return out, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    return err / scale if scale > 0 else err


def assert_same(module: MultiVAE, batch: dict, eps: torch.Tensor) -> tuple:
    full, g_full = run(module, batch, eps, skip=False)
    fast, g_fast = run(module, batch, eps, skip=True)
    for term in TERMS:
        a, b = getattr(fast, term), getattr(full, term)
        assert torch.isfinite(a).all(), term
        assert rel_err(a, b) <= RTOL, f"{term}: relative error {rel_err(a, b):.2e}"
    assert g_full.keys() == g_fast.keys()
    for name, g in g_full.items():
        if g is None:  # unused by these options (e.g. no covariate part): unused by the fast path too
            assert g_fast[name] is None, name
            continue
        # a parameter the fast path never reached would have grad None (AdamW would then skip its
        # weight decay, DDP would wait for it): it must get a real (possibly zero) gradient
        assert g_fast[name] is not None, f"{name}: no gradient with skipping"
        assert rel_err(g_fast[name], g) <= RTOL, f"grad {name}: relative error {rel_err(g_fast[name], g):.2e}"
    return full, fast, g_fast


OPTIONS = [
    {},
    {"gene_likelihood": "nb", "dispersion": "gene-batch", "modality_weights": "cell", "n_obs": 40},
    {"gene_likelihood": "poisson", "modality_penalty": "MMD", "modality_weights": "universal"},
    {"dispersion": "gene-cell", "n_cats_per_cov": (3,), "n_continuous_cov": 2, "encode_covariates": True,
     "deeply_inject_covariates": True},
    {"use_size_factor": True, "latent_distribution": "ln"},
    {"rna_library": "lognormal", "n_cats_per_cov": (3,), "encode_covariates": True},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_skipping_equals_full_computation(pbmc_counts, options, layout):
    torch.manual_seed(0)
    module = MultiVAE(45, 174, n_batch=2, **options).double().eval()
    randomize(module)
    batch = make_batch(
        pbmc_counts,
        n_cats=options.get("n_cats_per_cov", ()),
        n_cont=options.get("n_continuous_cov", 0),
        size_factor=options.get("use_size_factor", False),
    )
    if layout == "csr":
        batch = to_csr(batch)
    eps = torch.randn(12, module.n_noise, dtype=torch.float64)  # a lognormal library's noise too
    full, fast, _ = assert_same(module, batch, eps)
    mask = batch[keys.MASK]
    # the fast path really skipped: decoder outputs exist only for the measured rows
    assert torch.equal(fast.outputs["rna_rows"], mask[:, 0].nonzero().squeeze(1))
    assert torch.equal(fast.outputs["atac_rows"], mask[:, 1].nonzero().squeeze(1))
    assert fast.outputs["px_rate"].shape[0] == 9 and fast.outputs["p"].shape[0] == 9
    rows = fast.outputs["atac_rows"]
    assert rel_err(fast.outputs["p"], full.outputs["p"][rows]) <= RTOL
    assert (fast.recon_rna[~mask[:, 0]] == 0).all() and (fast.recon_atac[~mask[:, 1]] == 0).all()


@pytest.mark.parametrize("missing", [0, 1])
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_batch_without_one_modality(pbmc_counts, missing, layout):
    """No cell measures modality ``missing``: its decoder runs on 0 rows, every parameter still gets
    a (zero) gradient like the full computation, and nothing is NaN."""
    torch.manual_seed(0)
    module = MultiVAE(45, 174, n_batch=2).double().eval()
    randomize(module)
    batch = make_batch(pbmc_counts)
    batch[keys.MASK][:, missing] = False
    batch[keys.RNA if missing == 0 else keys.ATAC].zero_()
    if layout == "csr":
        batch = to_csr(batch)
    eps = torch.randn(12, module.n_latent, dtype=torch.float64)
    _, fast, grads = assert_same(module, batch, eps)
    recon = fast.recon_rna if missing == 0 else fast.recon_atac
    assert (recon == 0).all() and (fast.penalty == 0).all()
    decoder = module.rna_decoder if missing == 0 else module.atac_decoder
    for name, _ in decoder.named_parameters():
        grad = grads[("rna_decoder." if missing == 0 else "atac_decoder.") + name]
        assert grad is not None and (grad == 0).all()


def test_batch_norm_decodes_every_row(pbmc_counts):
    """Train-mode batch norm couples rows: the module keeps the full computation (still equal)."""
    torch.manual_seed(0)
    module = MultiVAE(45, 174, n_batch=2, use_batch_norm="both", dropout_rate=0.0).double().train()
    randomize(module)
    batch = make_batch(pbmc_counts)
    eps = torch.randn(12, module.n_latent, dtype=torch.float64)
    _, fast, _ = assert_same(module, batch, eps)
    assert fast.outputs["p"].shape[0] == 12 and fast.outputs["px_rate"].shape[0] == 12


def test_measured_only_inference_placeholders(pbmc_counts):
    """inference(measured_only=True): real encodings on measured rows, (0, 1, 0) elsewhere, and the
    joint posterior equal to the full one (<= 1e-12; the placeholders enter with weight <= 1e-15)."""
    torch.manual_seed(0)
    module = MultiVAE(45, 174, n_batch=2).double().eval()
    randomize(module)
    batch = to_csr(make_batch(pbmc_counts))
    eps = torch.randn(12, module.n_latent, dtype=torch.float64)
    with torch.no_grad():
        full = module.inference(batch, eps)
        fast = module.inference(batch, eps, measured_only=True)
    mask = batch[keys.MASK]
    for name, m in (("rna", mask[:, 0]), ("atac", mask[:, 1])):
        assert rel_err(fast[f"qzm_{name}"][m], full[f"qzm_{name}"][m]) <= RTOL
        assert (fast[f"qzm_{name}"][~m] == 0).all() and (fast[f"qzv_{name}"][~m] == 1).all()
        assert (fast[f"lib_{name}"][~m] == 0).all()
    for key in ("qz_m", "qz_v", "z"):
        assert rel_err(fast[key], full[key]) <= RTOL, key


def test_select_rows_keeps_csr(pbmc_counts):
    x = pbmc_counts[1][:20].clone()
    x[3] = 0  # an empty row among the selected ones
    csr = to_csr({keys.RNA: x, keys.ATAC: x})[keys.ATAC]
    rows = torch.tensor([0, 3, 7, 19])
    got = select_rows(csr, rows)
    assert got.layout == torch.sparse_csr and got.crow_indices().dtype == torch.int32
    assert torch.equal(got.to_dense(), x[rows])
    empty = select_rows(csr, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, x.shape[1]) and empty.values().numel() == 0


def test_select_rows_fast_path_when_left_out_rows_are_empty(pbmc_counts):
    """Rows left out are empty (an unmeasured modality): the entries are reused, not gathered."""
    x = pbmc_counts[1][:10].clone()
    x[[1, 4, 8]] = 0
    csr = to_csr({keys.RNA: x, keys.ATAC: x})[keys.ATAC]
    rows = torch.tensor([0, 2, 3, 5, 6, 7, 9])
    got = select_rows(csr, rows)
    assert got.values().data_ptr() == csr.values().data_ptr()  # no copy of the entries
    assert torch.equal(got.to_dense(), x[rows]) and got.crow_indices().dtype == torch.int32
