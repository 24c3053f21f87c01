"""Forward + gradient parity of ``MultiVAE`` with the reference ``scvi.module.MULTIVAE`` (scvi-tools 1.5.1).

How both see identical numbers: both modules are float64; our weights are copied into the reference
with ``trainer.reference`` (the tested mapping); both run in eval mode (dropout off, BatchNorm on
running statistics) except the explicit train-mode case, which uses dropout 0 so BatchNorm's batch
statistics are the only train-mode effect; and the reparameterisation noise is fixed: the
reference's ``Normal.rsample`` is patched to draw one fixed tensor E, and ours receives the same
``eps=E``. The minibatch is 12 real PBMC multiome cells (45 genes, 174 peaks): 6 paired, 3 RNA-only,
3 ATAC-only (the reference gets zero rows, we get the explicit mask).

Run: ``.venv/bin/python -m pytest tests/test_parity.py -q``
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
import torch.distributions.normal as tdn

from data import keys
from trainer.module import MultiVAE
from trainer.reference import (
    build_reference,
    ours_state_from_reference,
    reference_forward,
    reference_key,
    reference_state_from_ours,
    reference_tensors,
    to_reference_layout,
)

# the reference builds empty protein layers; torch warns about initialising them
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

PBMC = Path("/work/shared/data/pbmc_10x_multiome_muon_testsubset")
RTOL = 1e-6


@functools.lru_cache(maxsize=1)
def load_pbmc_counts() -> tuple[torch.Tensor, torch.Tensor]:
    """Real PBMC multiome counts (float64), cells with both modalities non-empty; read once per session."""
    rna = ad.read_h5ad(PBMC / "pbmc_muon_test_rna.h5ad")
    atac = ad.read_h5ad(PBMC / "pbmc_muon_test_atac.h5ad")
    assert list(rna.obs_names) == list(atac.obs_names)
    x_rna, x_atac = rna.X.toarray().astype(np.float64), atac.X.toarray().astype(np.float64)
    keep = (x_rna.sum(1) > 0) & (x_atac.sum(1) > 0)
    return torch.from_numpy(x_rna[keep]), torch.from_numpy(x_atac[keep])


@pytest.fixture
def pbmc_counts():
    return load_pbmc_counts()


def make_batch(
    counts, n_cells=12, n_batch=2, n_cats=(), n_cont=0, n_obs=40, seed=0, size_factor=False, layout="mixed"
):
    """Real cells; first half paired, then RNA-only, then ATAC-only; random covariates.

    ``layout="rna_only"`` / ``"atac_only"``: every cell measures that one modality (a minibatch
    without a single cell of the other modality: its decoder/likelihood sees no rows at all)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(counts[0].shape[0], generator=g)[:n_cells]
    mask = torch.ones(n_cells, 2, dtype=torch.bool)
    if layout == "mixed":
        mask[n_cells // 2 : 3 * n_cells // 4, 1] = False
        mask[3 * n_cells // 4 :, 0] = False
    else:
        mask[:, {"rna_only": 1, "atac_only": 0}[layout]] = False
    batch = {
        keys.RNA: counts[0][rows] * mask[:, :1],
        keys.ATAC: counts[1][rows] * mask[:, 1:],
        keys.MASK: mask,
        keys.BATCH: torch.randint(0, n_batch, (n_cells,), generator=g),
        keys.CAT_COVS: torch.stack([torch.randint(0, n, (n_cells,), generator=g) for n in n_cats], 1)
        if n_cats
        else torch.zeros(n_cells, 0, dtype=torch.long),
        keys.CONT_COVS: torch.randn(n_cells, n_cont, generator=g, dtype=torch.float64),
        keys.INDEX: torch.randperm(n_obs, generator=g)[:n_cells],
    }
    if size_factor:
        batch[keys.SIZE_FACTOR] = torch.rand(n_cells, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1
    return batch


def randomize(module: MultiVAE, seed: int = 1) -> None:
    """Non-trivial learned weights (modality weights, region factors, BN stats) so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("mod_weights", "region_factors") or "batch_norms" in name:
                p.copy_(
                    torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if "weight" in name else 0)
                )
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)


def fixed_noise(monkeypatch, noise: torch.Tensor) -> None:
    """Every (B, n_latent) reparameterised draw of the reference returns ``noise`` (others: zeros)."""

    def draw(shape, dtype, device):
        if tuple(shape) == tuple(noise.shape):
            return noise.clone().to(dtype)
        return torch.zeros(shape, dtype=dtype, device=device)

    monkeypatch.setattr(tdn, "_standard_normal", draw)


def rel_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item() if ours.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    # absolute floor 1e-12: gradients that are analytically 0 (a bias feeding BatchNorm) are ~1e-16
    assert err <= rtol * scale + 1e-12, f"{what}: max abs diff {err:.3e} vs scale {scale:.3e}"


def run_parity(counts, monkeypatch, train_mode=False, kl_weight=0.7, batch_kw=None, **options):
    torch.manual_seed(0)
    batch_kw = dict(batch_kw or {})
    n_batch = options.setdefault("n_batch", 2)
    batch = make_batch(
        counts,
        n_batch=n_batch,
        n_cats=options.get("n_cats_per_cov", ()),
        n_cont=options.get("n_continuous_cov", 0),
        size_factor=options.get("use_size_factor", False),
        **batch_kw,
    )
    if options.get("modality_weights") == "cell":
        options["n_obs"] = 40
    ours = MultiVAE(counts[0].shape[1], counts[1].shape[1], **options).double()
    randomize(ours)
    ours.train(train_mode)
    ref = build_reference(ours)
    noise = torch.randn(batch[keys.RNA].shape[0], ours.n_latent, dtype=torch.float64)
    fixed_noise(monkeypatch, noise)

    ref_inf, ref_gen, ref_loss = reference_forward(
        ref, reference_tensors(batch, len(ours.n_cats_per_cov)), kl_weight
    )
    out = ours.loss(batch, kl_weight=kl_weight, eps=noise)
    o = out.outputs
    # The full passes (inference without measured_only, generative) equal the reference on every row;
    # the loss computed only what it can see (each modality encoded/decoded on its measured rows,
    # see MultiVAE.loss), so its outputs equal the reference on those rows.
    with torch.no_grad():
        full_inf = ours.inference(batch, noise)
        full_gen = ours.generative(full_inf["z"], batch, full_inf["lib_rna"])
    mask = batch[keys.MASK]
    for ours_key, ref_key, measured in [
        ("qzm_rna", "qzm_expr", mask[:, 0]),
        ("qzv_rna", "qzv_expr", mask[:, 0]),
        ("qzm_atac", "qzm_acc", mask[:, 1]),
        ("qzv_atac", "qzv_acc", mask[:, 1]),
        ("qz_m", "qz_m", None),
        ("qz_v", "qz_v", None),
        ("z", "z", None),
        ("lib_rna", "libsize_expr", mask[:, 0]),
        ("lib_atac", "libsize_acc", mask[:, 1]),
    ]:
        rel_close(full_inf[ours_key], ref_inf[ref_key], ours_key)
        from_sf = ours_key.startswith("lib_") and options.get("use_size_factor")  # given, not encoded
        rows = slice(None) if measured is None or from_sf else measured
        rel_close(o[ours_key][rows], ref_inf[ref_key][rows], f"loss outputs {ours_key}")
    for ours_key, ref_key, m in [("p", "p", 1), ("px_scale", "px_scale", 0), ("px_rate", "px_rate", 0),
                                 ("px_dropout", "px_dropout", 0)]:
        if o[ours_key] is None:  # zero-inflation head only built for zinb
            continue
        rel_close(full_gen[ours_key], ref_gen[ref_key], ours_key)
        # rows the loss decoded (all of them with a batch-norm decoder), compared where measured
        rows = o["atac_rows" if m else "rna_rows"]
        measured = mask[rows, m]
        rel_close(o[ours_key][measured], ref_gen[ref_key][rows][measured], f"loss outputs {ours_key}")
    rl = ref_loss.reconstruction_loss
    rel_close(out.recon_rna, rl["reconstruction_loss_expression"], "recon_rna")
    rel_close(out.recon_atac, rl["reconstruction_loss_accessibility"], "recon_atac")
    rel_close(out.kl, ref_loss.kl_local["kl_divergence_z"], "kl")
    ref_pen = ref_loss.kl_local["kl_divergence_paired"]
    ref_pen = torch.zeros_like(out.penalty) if isinstance(ref_pen, int) else ref_pen
    rel_close(out.penalty, ref_pen, "penalty")
    rel_close(out.loss, ref_loss.loss, "loss")

    out.loss.backward()
    ref_loss.loss.backward()
    ref_params = dict(ref.named_parameters())
    # zero-width covariate parts of fused first layers (no covariates) get no gradient: use zeros
    named = {
        n: p.grad if p.grad is not None or p.numel() else torch.zeros_like(p)
        for n, p in ours.named_parameters()
    }
    unused = [n for n, g in named.items() if g is None]
    for name in unused:  # unused by this likelihood (e.g. px_r with poisson): unused there too
        assert ref_params[reference_key(name)].grad is None, (
            f"no gradient for {name} but the reference has one"
        )
    grads = to_reference_layout({n: g for n, g in named.items() if g is not None})
    mapped = set(grads) | {reference_key(n) for n in unused}
    for rk, grad in grads.items():
        rel_close(grad, ref_params[rk].grad, f"grad {rk}")
    for rk, p in ref_params.items():  # reference-only parameters (protein branch, unused heads)
        if rk not in mapped and p.grad is not None:
            # the protein slot enters the joint variance with sqrt(1e-30 / sum) ~ 1e-15 weight
            assert p.grad.abs().max().item() < 1e-10, f"reference-only {rk} has a real gradient"
    return ours, ref


GRID = list(
    itertools.product(("zinb", "nb", "poisson"), ("equal", "universal", "cell"), ("Jeffreys", "None"))
)


@pytest.mark.parametrize(("likelihood", "weights", "penalty"), GRID)
def test_parity_likelihood_weights_penalty(pbmc_counts, monkeypatch, likelihood, weights, penalty):
    run_parity(
        pbmc_counts,
        monkeypatch,
        gene_likelihood=likelihood,
        modality_weights=weights,
        modality_penalty=penalty,
    )


@pytest.mark.parametrize(
    "options",
    [
        {"n_cats_per_cov": (3, 1), "n_continuous_cov": 2},
        {"n_cats_per_cov": (3,), "n_continuous_cov": 2, "encode_covariates": True},
        {"n_cats_per_cov": (3,), "n_continuous_cov": 2, "deeply_inject_covariates": True},
        {
            "n_cats_per_cov": (3, 4),
            "n_continuous_cov": 2,
            "encode_covariates": True,
            "deeply_inject_covariates": True,
        },
        {"n_cats_per_cov": (3,), "encode_covariates": True, "n_layers_encoder": 3, "n_layers_decoder": 3},
        {"n_batch": 1},
        {"n_batch": 1, "n_cats_per_cov": (2,), "n_continuous_cov": 1, "encode_covariates": True},
        {"latent_distribution": "ln"},
        {"use_size_factor": True, "gene_likelihood": "nb"},
        {"region_factors": False},
        {"use_layer_norm": "encoder", "use_batch_norm": "decoder"},
        {"use_layer_norm": "none", "use_batch_norm": "both", "n_hidden": 9, "n_latent": 3},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_parity_architecture_options(pbmc_counts, monkeypatch, options):
    run_parity(pbmc_counts, monkeypatch, **options)


def test_parity_train_mode_batch_norm(pbmc_counts, monkeypatch):
    """Train mode (BatchNorm on batch statistics) with dropout 0 so no random masks are involved."""
    run_parity(pbmc_counts, monkeypatch, train_mode=True, use_batch_norm="both", dropout_rate=0.0)


def test_reference_has_the_documented_sizes(pbmc_counts):
    """Default sizes follow the reference formulas: 174 regions -> hidden 13, latent 3."""
    ours = MultiVAE(45, 174)
    assert (ours.n_hidden, ours.n_latent) == (13, 3)
    ref = build_reference(ours)
    assert (int(ref.n_hidden), ref.n_latent) == (13, 3)
    assert MultiVAE(100, 100_000).n_hidden == 128


@pytest.mark.parametrize(
    "opts",
    [
        {"n_batch": 3, "n_cats_per_cov": (2,), "n_continuous_cov": 1, "encode_covariates": True,
         "modality_weights": "universal", "use_batch_norm": "both"},
        # no encoder covariates: the encoders' first Linear has no weight key of its own
        {"n_batch": 2},
    ],
    ids=["covariates", "plain"],
)
def test_state_dict_mapping_round_trip(opts):
    """ours -> reference -> ours is the identity in both directions, with and without encoder covariates."""
    ours = MultiVAE(45, 174, **opts).double()
    randomize(ours)
    ref = build_reference(ours)
    back = ours_state_from_reference(ref.state_dict(), ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k
    # reverse direction from an independently initialised reference
    fresh = build_reference(MultiVAE(45, 174, **opts).double())
    ours2 = MultiVAE(45, 174, **opts).double()
    ours2.load_state_dict(ours_state_from_reference(fresh.state_dict(), ours2.state_dict()))
    again = reference_state_from_ours(ours2.state_dict(), fresh.state_dict())
    for k, v in fresh.state_dict().items():
        assert torch.equal(again[k], v), k
