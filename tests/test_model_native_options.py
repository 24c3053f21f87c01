"""The fused C kernels (``model.native_kernels``, the CPU default) against the eager code for every
model option that changes what reaches them: region factors off (no s), size factors (the ATAC
library is given, not learned), covariates in the encoders, batch norm (train mode, running
statistics too), per-cell weights with the ln latent, the MMD penalty, and the likelihoods and
dispersions that fall back to eager code; each on a mixed minibatch and on minibatches with only RNA
or only ATAC cells. tests/test_native.py checks the kernels themselves and the default options.

Same weights, float32 CSR counts (the loader's format), fixed noise; loss terms, every gradient and
the BatchNorm running statistics compared.

Run: ``.venv/bin/python -m pytest tests/test_model_native_options.py -q``
"""

from __future__ import annotations

import pytest
import torch

from data import keys
from tests.test_parity import load_pbmc_counts, make_batch, randomize
from trainer import native
from trainer.module import MultiVAE
from trainer.native import ops

pytestmark = [
    pytest.mark.skipif(native.library() is None, reason=f"native kernels: {native.why_unavailable()}"),
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),
]


def _loader_batch(options: dict, layout: str) -> dict:
    batch = make_batch(
        load_pbmc_counts(),
        n_cells=20,
        n_cats=options.get("n_cats_per_cov", ()),
        n_cont=options.get("n_continuous_cov", 0),
        size_factor=options.get("use_size_factor", False),
        layout=layout,
    )
    for key in (keys.RNA, keys.ATAC):
        batch[key] = batch[key].float().to_sparse_csr()
    for key in (keys.CONT_COVS, keys.SIZE_FACTOR):
        if key in batch:
            batch[key] = batch[key].float()
    return batch


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float) -> None:
    a, b = a.detach().double(), b.detach().double()
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    # absolute floor: gradients that are analytically 0 (a bias feeding BatchNorm, the RNA encoder of
    # an ATAC-only minibatch behind a 1e-15 mixing weight) are float32 rounding noise in both
    assert err <= rtol * scale + 1e-6, f"{what}: max abs diff {err:.3e} vs scale {scale:.3e}"


def _feeds_batch_norm(module: MultiVAE, name: str) -> bool:
    """A Linear bias right before a train-mode BatchNorm: its gradient is analytically 0 (the batch
    mean is subtracted), so both sides hold float32 noise of the size of the other gradients' error."""
    if ".linears." not in name or not name.endswith(".bias"):
        return False
    return module.get_submodule(name.split(".linears.")[0]).batch_norms is not None


OPTIONS = [
    {},
    {"region_factors": False},
    {"use_size_factor": True},
    {"use_size_factor": True, "region_factors": False, "gene_likelihood": "nb"},
    {
        "n_cats_per_cov": (3,),
        "n_continuous_cov": 2,
        "encode_covariates": True,
        "deeply_inject_covariates": True,
    },
    {"use_batch_norm": "both"},
    {"latent_distribution": "ln", "modality_weights": "cell", "n_obs": 40, "modality_penalty": "MMD"},
    {"dispersion": "gene-batch"},
    {"dispersion": "gene-cell", "modality_weights": "universal"},
    {"gene_likelihood": "poisson", "use_layer_norm": "none"},
]


@pytest.mark.parametrize("layout", ["mixed", "rna_only", "atac_only"])
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "defaults"
)
def test_native_equals_eager_for_every_option(monkeypatch, options, layout):
    calls = {"zinb_nll": 0, "product_bernoulli_nll_logits": 0}
    for name in calls:  # count the kernels' use: a comparison of eager with eager would prove nothing
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(ops, name, spy)
    batch = _loader_batch(options, layout)
    torch.manual_seed(0)
    fast = MultiVAE(45, 174, n_batch=2, dropout_rate=0.0, **options)
    randomize(fast)
    slow = MultiVAE(45, 174, n_batch=2, dropout_rate=0.0, native_kernels=False, **options)
    slow.load_state_dict(fast.state_dict())
    fast.train(), slow.train()
    eps = torch.randn(20, fast.n_latent, generator=torch.Generator().manual_seed(3))
    outs = []
    for module in (fast, slow):
        out = module.loss(batch, kl_weight=0.7, eps=eps)
        out.loss.backward()
        outs.append(out)
    # the ATAC kernel scores every minibatch; the ZINB kernel takes one dispersion per gene only
    assert calls["product_bernoulli_nll_logits"] == 1
    native_zinb = (
        options.get("gene_likelihood", "zinb") == "zinb" and options.get("dispersion", "gene") == "gene"
    )
    assert calls["zinb_nll"] == int(native_zinb)
    for term in ("loss", "recon_rna", "recon_atac", "kl", "penalty"):
        _close(getattr(outs[0], term), getattr(outs[1], term), term, 1e-5)
    for (name, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None and not _feeds_batch_norm(fast, name):
            _close(a.grad, b.grad, f"grad {name}", 1e-4)
    for (name, a), (_, b) in zip(fast.named_buffers(), slow.named_buffers(), strict=True):
        if a.is_floating_point():
            _close(a, b, f"buffer {name}", 1e-5)
