"""More parity with the reference ``scvi.module.MULTIVAE`` (scvi-tools 1.5.1): option combinations that
tests/test_parity.py and tests/test_model_parity_options.py leave out.

* architecture combinations (norms on one side only, one-layer stacks, continuous-only or single-level
  covariates in the encoders, ln + per-cell weights + size factors, custom sizes), float64;
* train mode with BatchNorm on minibatches holding one modality only (batch statistics over all rows);
* dropout (a value-keyed mask, see tests/test_model_parity_options.py) on one-modality minibatches;
* the production path: float32 weights, float32 CSR counts, the native C kernels where they load,
  against the reference in float32 on the same (dense) counts;
* the normalized outputs: RNA scale rho and ATAC probabilities p decoded from the joint mean
  (``use_z_mean``), with and without ``transform_batch``, for every layout.

Run: ``.venv/bin/python -m pytest tests/test_parity_more.py -q``
"""

from __future__ import annotations

import pytest
import torch

from data import keys
from tests.test_model_parity_options import _value_dropout
from tests.test_parity import fixed_noise, load_pbmc_counts, make_batch, randomize, rel_close, run_parity
from trainer.module import MultiVAE
from trainer.reference import build_reference, reference_forward, reference_tensors, to_reference_layout

pytestmark = pytest.mark.filterwarnings(
    "ignore:Initializing zero-element tensors", "ignore:Sparse CSR tensor support is in beta"
)


@pytest.fixture
def pbmc_counts():
    return load_pbmc_counts()


def _ids(o: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in o.items()) or "defaults"


@pytest.mark.parametrize(
    "options",
    [
        {"use_batch_norm": "encoder"},
        {"use_layer_norm": "decoder"},
        {"use_layer_norm": "none"},
        {"n_layers_encoder": 1, "n_layers_decoder": 1, "n_cats_per_cov": (3,), "n_continuous_cov": 2,
         "encode_covariates": True, "deeply_inject_covariates": True},
        {"n_layers_decoder": 3, "n_cats_per_cov": (3,), "n_continuous_cov": 1, "deeply_inject_covariates": True},
        {"n_continuous_cov": 3, "encode_covariates": True, "deeply_inject_covariates": True, "n_layers_encoder": 3},
        {"n_cats_per_cov": (1,), "encode_covariates": True, "deeply_inject_covariates": True},
        {"latent_distribution": "ln", "modality_weights": "cell", "use_size_factor": True, "gene_likelihood": "poisson"},
        {"use_size_factor": True, "n_cats_per_cov": (2,), "n_continuous_cov": 1, "encode_covariates": True,
         "deeply_inject_covariates": True, "n_layers_encoder": 3, "n_layers_decoder": 3},
        {"n_hidden": 7, "n_latent": 5, "n_batch": 4, "gene_likelihood": "nb", "modality_penalty": "None"},
    ],
    ids=_ids,
)  # fmt: skip
def test_parity_more_architectures(pbmc_counts, monkeypatch, options):
    run_parity(pbmc_counts, monkeypatch, **options)


@pytest.mark.parametrize(
    ("options", "layout"),
    [
        ({"use_batch_norm": "both", "latent_distribution": "ln"}, "rna_only"),
        ({"use_batch_norm": "both", "n_cats_per_cov": (3,), "n_continuous_cov": 2, "encode_covariates": True},
         "atac_only"),
        ({"use_batch_norm": "encoder"}, "rna_only"),
        ({"use_batch_norm": "decoder", "gene_likelihood": "nb"}, "atac_only"),
        ({"use_batch_norm": "encoder", "use_layer_norm": "decoder"}, "mixed"),
    ],
    ids=lambda o: o if isinstance(o, str) else _ids(o),
)  # fmt: skip
def test_parity_train_mode_batch_norm_one_modality(pbmc_counts, monkeypatch, options, layout):
    """BatchNorm on batch statistics couples rows: the networks it sits in run on every row (also the
    other modality's zero rows), as in the reference, whatever the minibatch holds."""
    run_parity(
        pbmc_counts, monkeypatch, train_mode=True, dropout_rate=0.0, batch_kw={"layout": layout}, **options
    )


@pytest.mark.parametrize("layout", ["rna_only", "atac_only"])
@pytest.mark.parametrize(
    "options",
    [
        {"dropout_rate": 0.2},
        {"dropout_rate": 0.3, "use_batch_norm": "encoder", "latent_distribution": "ln", "modality_weights": "cell"},
        {"dropout_rate": 0.2, "n_cats_per_cov": (3,), "n_continuous_cov": 1, "encode_covariates": True,
         "use_size_factor": True, "gene_likelihood": "nb"},
    ],
    ids=_ids,
)  # fmt: skip
def test_parity_dropout_one_modality(pbmc_counts, monkeypatch, layout, options):
    monkeypatch.setattr(torch.nn.Dropout, "forward", _value_dropout)
    run_parity(pbmc_counts, monkeypatch, train_mode=True, batch_kw={"layout": layout}, **options)


def _float32_pair(options: dict, layout: str, n_cells: int, train: bool):
    torch.manual_seed(0)
    options = {"n_batch": 2, **options}
    if options.get("modality_weights") == "cell":
        options["n_obs"] = max(40, n_cells)
    b64 = make_batch(
        load_pbmc_counts(),
        n_cells=n_cells,
        n_batch=options["n_batch"],
        n_cats=options.get("n_cats_per_cov", ()),
        n_cont=options.get("n_continuous_cov", 0),
        size_factor=options.get("use_size_factor", False),
        layout=layout,
        n_obs=max(40, n_cells),
        seed=3,
    )
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in b64.items()}
    ref_tensors = reference_tensors(batch, len(options.get("n_cats_per_cov", ())))
    for key in (keys.RNA, keys.ATAC):
        batch[key] = batch[key].to_sparse_csr()  # the loader's format: native kernels where they load
    ours = MultiVAE(45, 174, **options)
    randomize(ours)
    ours.train(train)
    return ours, build_reference(ours), batch, ref_tensors


def _close32(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, what
    if not ref.numel():
        return
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    # absolute floor: analytically-zero gradients (a bias before train-mode BatchNorm) are float32 noise
    assert err <= rtol * scale + 1e-6, f"{what}: max abs diff {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("layout", ["mixed", "rna_only", "atac_only"])
@pytest.mark.parametrize(
    ("options", "train"),
    [
        ({}, False),
        ({"native_kernels": False}, False),  # the eager CSR code (CUDA, or where the C kernels do not load)
        ({"gene_likelihood": "nb", "modality_weights": "cell", "latent_distribution": "ln"}, False),
        ({"n_cats_per_cov": (3,), "n_continuous_cov": 2, "encode_covariates": True,
          "deeply_inject_covariates": True, "use_size_factor": True}, False),
        ({"use_batch_norm": "both", "region_factors": False, "dropout_rate": 0.0, "n_layers_encoder": 1,
          "n_layers_decoder": 3}, True),
    ],
    ids=["defaults", "eager-csr", "nb-cell-ln", "covariates-size-factors", "train-batch-norm"],
)  # fmt: skip
def test_parity_float32_csr_native(monkeypatch, options, train, layout):
    """float32 CSR counts (native ZINB / ATAC / first-layer kernels where they load) against the
    float32 reference: every loss term, the latents, the libraries and every gradient to ~1e-5."""
    ours, ref, batch, tensors = _float32_pair(options, layout, 64, train)
    noise = torch.randn(64, ours.n_latent)
    fixed_noise(monkeypatch, noise)
    ref_inf, _, ref_loss = reference_forward(ref, tensors, 0.7)
    out = ours.loss(batch, kl_weight=0.7, eps=noise)
    rl = ref_loss.reconstruction_loss
    _close32(out.recon_rna, rl["reconstruction_loss_expression"], "recon_rna")
    _close32(out.recon_atac, rl["reconstruction_loss_accessibility"], "recon_atac")
    _close32(out.kl, ref_loss.kl_local["kl_divergence_z"], "kl")
    _close32(out.penalty, ref_loss.kl_local["kl_divergence_paired"], "penalty")
    _close32(out.loss, ref_loss.loss, "loss")
    mask = batch[keys.MASK]
    for ours_key, ref_key, rows in [
        ("qzm_rna", "qzm_expr", mask[:, 0]),
        ("qzv_rna", "qzv_expr", mask[:, 0]),
        ("qzm_atac", "qzm_acc", mask[:, 1]),
        ("qzv_atac", "qzv_acc", mask[:, 1]),
        ("qz_m", "qz_m", slice(None)),
        ("qz_v", "qz_v", slice(None)),
        ("lib_rna", "libsize_expr", slice(None) if ours.use_size_factor else mask[:, 0]),
        ("lib_atac", "libsize_acc", slice(None) if ours.use_size_factor else mask[:, 1]),
    ]:
        _close32(out.outputs[ours_key][rows], ref_inf[ref_key][rows], ours_key)
    out.loss.backward()
    ref_loss.loss.backward()
    ref_params = dict(ref.named_parameters())
    grads = to_reference_layout({n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    assert grads
    for name, grad in grads.items():
        _close32(grad, ref_params[name].grad, f"grad {name}")


@pytest.mark.parametrize("layout", ["mixed", "rna_only", "atac_only"])
@pytest.mark.parametrize(
    "options",
    [
        {"n_batch": 3},
        {"n_batch": 3, "latent_distribution": "ln", "modality_weights": "universal"},
        {"n_batch": 3, "n_cats_per_cov": (3,), "n_continuous_cov": 2, "encode_covariates": True,
         "deeply_inject_covariates": True},
        {"n_batch": 3, "use_size_factor": True, "use_batch_norm": "both"},
    ],
    ids=_ids,
)  # fmt: skip
def test_parity_normalized_outputs(pbmc_counts, monkeypatch, options, layout):
    """rho (``decode_expression_scale``) and p (``decode_accessibility``) decoded from the joint mean
    equal the reference's ``generative(use_z_mean=True, transform_batch=...)`` ``px_scale`` / ``p``
    (for ln latents both decode the raw mean: spec gotcha 22)."""
    torch.manual_seed(0)
    batch = make_batch(
        pbmc_counts,
        n_batch=3,
        n_cats=options.get("n_cats_per_cov", ()),
        n_cont=options.get("n_continuous_cov", 0),
        size_factor=options.get("use_size_factor", False),
        layout=layout,
    )
    ours = MultiVAE(45, 174, **options).double().eval()
    randomize(ours)
    ref = build_reference(ours)
    tensors = reference_tensors(batch, len(ours.n_cats_per_cov))
    noise = torch.randn(12, ours.n_latent, dtype=torch.float64)
    fixed_noise(monkeypatch, noise)
    with torch.no_grad():
        ref_inf, _, _ = reference_forward(ref, tensors)
        qz_m = ours.inference(batch, eps=torch.zeros_like(noise))["qz_m"]
        rel_close(qz_m, ref_inf["qz_m"], "qz_m")
        for code in (None, 0, 2):
            gen = ref.generative(
                **ref._get_generative_input(tensors, ref_inf), use_z_mean=True, transform_batch=code
            )
            codes = None if code is None else torch.full((12,), code)
            rel_close(
                ours.decode_expression_scale(qz_m, batch, batch_codes=codes), gen["px_scale"], f"rho {code}"
            )
            rel_close(ours.decode_accessibility(qz_m, batch, batch_codes=codes), gen["p"], f"p {code}")


@pytest.mark.filterwarnings("ignore:.*fused.*")
@pytest.mark.parametrize(
    ("options", "layouts"),
    [
        ({"n_batch": 2, "latent_distribution": "ln", "modality_weights": "equal", "gene_likelihood": "poisson",
          "modality_penalty": "None"}, ("mixed", "rna_only", "atac_only")),
        ({"n_batch": 4, "n_cats_per_cov": (3,), "n_continuous_cov": 2, "encode_covariates": True,
          "deeply_inject_covariates": True, "n_layers_encoder": 1, "n_layers_decoder": 3, "gene_likelihood": "nb"},
         ("mixed", "rna_only", "atac_only")),
        ({"n_batch": 2, "use_batch_norm": "encoder", "use_layer_norm": "decoder", "region_factors": False},
         ("atac_only", "rna_only", "mixed")),
        ({"n_batch": 3, "modality_weights": "cell", "n_obs": 40, "use_size_factor": True, "encode_covariates": True},
         ("mixed",) * 3),
    ],
    ids=["ln-poisson-no-penalty", "4-batches-covariates-1-3-layers-nb", "bn-encoder-ln-decoder-no-rf",
         "cell-size-factors-encode-covariates"],
)  # fmt: skip
def test_three_steps_more_options(pbmc_counts, monkeypatch, options, layouts):
    """tests/test_step_parity.py's three training steps (VAE + adversarial classifier, the reference's
    own training plan and optimizers) for option sets it leaves out."""
    from tests.test_step_parity import test_three_steps_leave_identical_weights

    test_three_steps_leave_identical_weights(pbmc_counts, monkeypatch, dict(options), layouts)
