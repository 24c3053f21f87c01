"""Parity with the reference ``scvi.module.MULTIVAE`` (scvi-tools 1.5.1) for what tests/test_parity.py
leaves out: minibatches with one modality only, dropout in train mode, size factors with every
likelihood, the dispersions the reference breaks (against the reference with its one-line bug fixed)
and the "MMD" penalty (a documented deviation: ours is the reference's divided by the batch size).

Same harness as tests/test_parity.py: float64, the same weights in both (``trainer.reference``), fixed
reparameterisation noise; loss terms, inference outputs and every gradient compared.

Run: ``.venv/bin/python -m pytest tests/test_model_parity_options.py -q``
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch.nn import functional as F

from data import keys
from tests.test_parity import fixed_noise, load_pbmc_counts, make_batch, randomize, rel_close, run_parity
from trainer.module import MultiVAE
from trainer.reference import build_reference, reference_forward, reference_tensors, to_reference_layout

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


@pytest.fixture
def pbmc_counts():
    return load_pbmc_counts()


@pytest.mark.parametrize("layout", ["rna_only", "atac_only"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"modality_weights": "universal", "modality_penalty": "MMD", "gene_likelihood": "nb"},
        {"modality_weights": "cell", "latent_distribution": "ln", "gene_likelihood": "poisson"},
        {
            "n_cats_per_cov": (3,),
            "n_continuous_cov": 2,
            "encode_covariates": True,
            "deeply_inject_covariates": True,
        },
        {"use_batch_norm": "decoder", "use_layer_norm": "encoder"},
        {"use_size_factor": True},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_parity_minibatch_with_one_modality(pbmc_counts, monkeypatch, layout, options):
    """No cell of the other modality in the minibatch: its decoder and likelihood run on zero rows
    (ours) or are masked to zero (the reference); every term and gradient still agrees."""
    run_parity(pbmc_counts, monkeypatch, batch_kw={"layout": layout}, **options)


@pytest.mark.parametrize(
    "options",
    [
        {"gene_likelihood": "zinb"},
        {"gene_likelihood": "poisson", "region_factors": False},
        {
            "gene_likelihood": "zinb",
            "use_batch_norm": "both",
            "n_cats_per_cov": (3,),
            "n_continuous_cov": 2,
            "encode_covariates": True,
        },
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_parity_size_factors(pbmc_counts, monkeypatch, options):
    """Size factors replace the library networks (log(sf_rna + 1e-6), sf_atac raw) and switch the RNA
    scale to softplus, for every likelihood (tests/test_parity.py covers nb only)."""
    run_parity(pbmc_counts, monkeypatch, use_size_factor=True, **options)


def _value_dropout(self, x):
    """Dropout whose mask is a fixed function of each value and its column, not of the RNG: both
    implementations compute the same pre-dropout activations, so they draw the same masks whatever
    order they run their networks in (the reference encodes ATAC first, ours RNA first)."""
    if not self.training or self.p == 0:
        return x
    cols = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
    u = torch.frac(torch.sin(x * 12.9898 + cols * 78.233).abs() * 43758.5453)
    return x * (u >= self.p).to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "n_cats_per_cov": (3,),
            "n_continuous_cov": 2,
            "encode_covariates": True,
            "deeply_inject_covariates": True,
            "n_layers_encoder": 3,
        },
        {"use_batch_norm": "both", "use_layer_norm": "none", "dropout_rate": 0.3},
    ],
    ids=["defaults", "covariates-3-layers", "batch-norm-p0.3"],
)
def test_parity_train_mode_dropout(pbmc_counts, monkeypatch, options):
    """Train mode with dropout on: the same layers drop (only the z-encoders' blocks), with the same
    1 / (1 - p) scaling; a dropout in a library network or a decoder would change the numbers."""
    monkeypatch.setattr(torch.nn.Dropout, "forward", _value_dropout)
    options.setdefault("dropout_rate", 0.1)
    ours, _ = run_parity(pbmc_counts, monkeypatch, train_mode=True, **options)
    # the patched dropout really acted (a test with dropout silently off would pass without it)
    x = torch.randn(50, 20, dtype=torch.float64)
    dropped = ours.rna_encoder.z_stack.dropout(x)
    assert ((dropped == 0).double().mean() - options["dropout_rate"]).abs() < 0.1


def _fixed_generative(
    self,
    z,
    qz_m,
    batch_index,
    cont_covs=None,
    cat_covs=None,
    libsize_expr=None,
    use_z_mean=False,
    label=None,
    transform_batch=None,
):
    """The reference's ``MULTIVAE.generative`` for the RNA/ATAC outputs with its dispersion bug fixed:
    1.5.1 returns ``exp(self.px_r)`` whatever the dispersion (gene-batch: a (G, n_batch) matrix the loss
    cannot broadcast; gene-cell: no ``px_r`` at all) and drops the decoder's per-cell head. Here the
    per-cell dispersion it computes (gene-batch: one-hot(batch) @ px_r.T) or the decoder's px_r head
    (gene-cell) is what the loss scores; everything else is the reference's own networks."""
    cats = torch.split(cat_covs, 1, dim=1) if cat_covs is not None else ()
    if transform_batch is not None:
        batch_index = torch.ones_like(batch_index) * transform_batch
    latent = qz_m if use_z_mean else z
    h = latent if cont_covs is None else torch.cat([latent, cont_covs], dim=-1)
    p = self.z_decoder_accessibility(h, batch_index, *cats)
    px_scale, px_r, px_rate, px_dropout = self.z_decoder_expression(
        self.gene_dispersion, h, libsize_expr, batch_index, *cats, label
    )
    if self.gene_dispersion == "gene-batch":
        px_r = F.linear(F.one_hot(batch_index.squeeze(-1), self.n_batch).to(self.px_r.dtype), self.px_r)
    return {
        "p": p,
        "px_scale": px_scale,
        "px_r": torch.exp(px_r),
        "px_rate": px_rate,
        "px_dropout": px_dropout,
    }


def _pair(dispersion: str, likelihood: str, **options):
    torch.manual_seed(0)
    ours = (
        MultiVAE(45, 174, n_batch=3, gene_likelihood=likelihood, dispersion=dispersion, **options)
        .double()
        .eval()
    )
    randomize(ours)
    ref = build_reference(ours)
    ref.generative = types.MethodType(_fixed_generative, ref)
    return ours, ref


def _compare_gradients(ours, ref):
    rp = dict(ref.named_parameters())
    grads = to_reference_layout({n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    assert "px_r" in grads or "z_decoder_expression.px_r_decoder.weight" in grads
    for name, grad in grads.items():
        rel_close(grad, rp[name].grad, f"grad {name}")


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
@pytest.mark.parametrize("dispersion", ["gene-batch", "gene-cell"])
@pytest.mark.parametrize("layout", ["mixed", "rna_only"])
def test_parity_dispersions_the_reference_breaks(pbmc_counts, monkeypatch, dispersion, likelihood, layout):
    """gene-batch (theta of the cell's batch) and gene-cell (theta from the decoder's px_r head) equal
    the reference with its dispersion bug fixed: RNA recon, loss and every gradient."""
    ours, ref = _pair(dispersion, likelihood, n_cats_per_cov=(2,), n_continuous_cov=1)
    batch = make_batch(pbmc_counts, n_batch=3, n_cats=(2,), n_cont=1, layout=layout)
    assert batch[keys.BATCH].unique().numel() == 3  # every batch's dispersion column is exercised
    noise = torch.randn(12, ours.n_latent, dtype=torch.float64)
    fixed_noise(monkeypatch, noise)
    _, ref_gen, ref_loss = reference_forward(ref, reference_tensors(batch, 1), 0.6)
    out = ours.loss(batch, kl_weight=0.6, eps=noise)
    rl = ref_loss.reconstruction_loss
    rel_close(out.recon_rna, rl["reconstruction_loss_expression"], "recon_rna")
    rel_close(out.recon_atac, rl["reconstruction_loss_accessibility"], "recon_atac")
    rel_close(out.loss, ref_loss.loss, "loss")
    rows = out.outputs["rna_rows"]
    rel_close(out.outputs["theta"].expand(len(rows), -1), ref_gen["px_r"][rows], "theta")
    out.loss.backward()
    ref_loss.loss.backward()
    _compare_gradients(ours, ref)


def test_parity_gene_cell_without_region_factors(pbmc_counts, monkeypatch):
    """The reference without region factors and with gene-cell dispersion holds neither ``region_factors`` nor
    ``px_r``: the parity harness read its float dtype from one of them (an AttributeError, never a comparison)."""
    ours, ref = _pair("gene-cell", "zinb", region_factors=False)
    assert ref.region_factors is None and not hasattr(ref, "px_r")
    batch = make_batch(pbmc_counts, n_batch=3)
    noise = torch.randn(12, ours.n_latent, dtype=torch.float64)
    fixed_noise(monkeypatch, noise)
    _, _, ref_loss = reference_forward(ref, reference_tensors(batch), 0.6)
    out = ours.loss(batch, kl_weight=0.6, eps=noise)
    rel_close(out.loss, ref_loss.loss, "loss")
    out.loss.backward()
    ref_loss.loss.backward()
    _compare_gradients(ours, ref)


@pytest.mark.parametrize("dispersion", ["gene-batch", "gene-cell"])
def test_dispersion_follows_transform_batch(pbmc_counts, monkeypatch, dispersion):
    """``generative(batch_codes=...)`` (transform_batch) decodes with that batch's dispersion, as the
    fixed reference's ``generative(transform_batch=...)``."""
    ours, ref = _pair(dispersion, "zinb")
    batch = make_batch(pbmc_counts, n_batch=3)
    noise = torch.randn(12, ours.n_latent, dtype=torch.float64)
    fixed_noise(monkeypatch, noise)
    tensors = reference_tensors(batch)
    with torch.no_grad():
        inf = ours.inference(batch, noise)
        gen = ours.generative(inf["z"], batch, inf["lib_rna"], batch_codes=torch.full((12,), 2))
        ref_inf, _, _ = reference_forward(ref, tensors)
        ref_gen = ref.generative(**ref._get_generative_input(tensors, ref_inf), transform_batch=2)
    for key in ("px_scale", "px_rate"):
        rel_close(gen[key], ref_gen[key], key)
    rel_close(gen["theta"].expand(12, -1), ref_gen["px_r"], "theta")
    if dispersion == "gene-batch":
        torch.testing.assert_close(gen["theta"], torch.exp(ours.px_r[:, 2]).expand(12, -1))


@pytest.mark.parametrize("layout", ["mixed", "rna_only"])
def test_mmd_penalty_is_the_reference_per_cell(pbmc_counts, monkeypatch, layout):
    """Documented deviation (spec Part A 3, trainer/module.py): the reference adds the minibatch *sum*
    of ||mu_rna - mu_atac|| over paired cells to every cell; ours gives each paired cell its own
    norm. So our per-cell penalties sum to the reference's per-cell value, our loss is the reference's
    minus (B - 1) / B of that sum, and with that term put back every gradient is the reference's."""
    torch.manual_seed(0)
    ours = MultiVAE(45, 174, n_batch=2, modality_penalty="MMD", modality_weights="universal").double().eval()
    randomize(ours)
    ref = build_reference(ours)
    batch = make_batch(pbmc_counts, layout=layout)
    noise = torch.randn(12, ours.n_latent, dtype=torch.float64)
    fixed_noise(monkeypatch, noise)
    _, _, ref_loss = reference_forward(ref, reference_tensors(batch), 0.4)
    out = ours.loss(batch, kl_weight=0.4, eps=noise)
    ref_pen = ref_loss.kl_local["kl_divergence_paired"]
    paired = batch[keys.MASK].all(dim=1)
    assert (out.penalty[~paired] == 0).all()
    assert bool((out.penalty[paired] > 0).all())
    rel_close(out.penalty.sum().expand(12), ref_pen, "penalty sum")
    qm = out.outputs
    expected = torch.linalg.norm(qm["qzm_rna"] - qm["qzm_atac"], dim=1) * paired
    rel_close(out.penalty, expected, "per-cell penalty")
    B = 12
    adjusted = out.loss + (B - 1) / B * out.penalty.sum()
    rel_close(adjusted, ref_loss.loss, "loss + (B-1)/B * sum")
    adjusted.backward()
    ref_loss.loss.backward()
    rp = dict(ref.named_parameters())
    for name, grad in to_reference_layout({n: p.grad for n, p in ours.named_parameters()}).items():
        rel_close(grad, rp[name].grad, f"grad {name}")
    assert math.isfinite(out.loss.item())
