"""What a GPU run relies on, checked on a CPU-only machine.

No GPU here, so "another device" is the ``meta`` device (shapes and devices, no data: any CPU tensor
that meets a device tensor raises, as it would on CUDA) or another default device, and "another
dtype" is bf16 on the CPU (the dtype of DeepSpeed's bf16 module and of autocast):

* the training loss (and its backward) and every predictor run with no CPU tensor mixed in;
* the native C kernels only ever see CPU float32 tensors and write only into CPU memory, whatever
  ``torch.set_default_device`` says, and bf16 / other-device operands take the eager code;
* inference results are float32 and finite under bf16 autocast, ``ln`` latent means do not depend on
  the device's random generator, and a bf16 module is exported as float32 and loads on the CPU.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_device_paths.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx.experimental._config as fx_config
from safetensors import safe_open
from safetensors.torch import save_file

from data import keys
from trainer import native, predict
from trainer.module import MultiVAE
from trainer.native import ops as native_ops
from trainer.nn import _CsrMatmul, input_matmul_t

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")
needs_native = pytest.mark.skipif(native.library() is None, reason=f"native kernels: {native.why_unavailable()}")


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (fresh native-library state; a crash must not take pytest down)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


# ------------------------------------------------------------------------------------------ batches
def cpu_batch(n: int = 24, n_genes: int = 30, n_regions: int = 80, seed: int = 0) -> dict:
    """Paired, RNA-only and ATAC-only cells with small integer counts (dense; ``to_csr`` makes CSR)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[n // 2:3 * n // 4, 1] = False
    mask[3 * n // 4:, 0] = False
    rna = (torch.rand(n, n_genes, generator=g) < 0.4) * torch.randint(1, 5, (n, n_genes), generator=g)
    atac = (torch.rand(n, n_regions, generator=g) < 0.1).long()
    return {keys.RNA: (rna * mask[:, :1]).float(), keys.ATAC: (atac * mask[:, 1:]).float(), keys.MASK: mask,
            keys.BATCH: torch.randint(0, 2, (n,), generator=g), keys.CAT_COVS: torch.randint(0, 3, (n, 1), generator=g),
            keys.CONT_COVS: torch.rand(n, 1, generator=g), keys.INDEX: torch.arange(n),
            keys.SIZE_FACTOR: torch.rand(n, 2, generator=g) * 0.9 + 0.1}


def to_csr(batch: dict) -> dict:
    return {**batch, keys.RNA: batch[keys.RNA].to_sparse_csr(), keys.ATAC: batch[keys.ATAC].to_sparse_csr()}


def meta_batch(csr: bool, n: int = 8, n_genes: int = 30, n_regions: int = 80) -> dict:
    """A batch on the meta device; CSR counts with int32 indices, as the loader's."""
    def counts(width: int) -> torch.Tensor:
        if not csr:
            return torch.empty(n, width, device=META)
        nnz = n * width // 3  # above nn.DENSIFY_ABOVE for RNA-like density: both first-layer paths run
        return torch.sparse_csr_tensor(torch.zeros(n + 1, dtype=torch.int32, device=META),
                                       torch.zeros(nnz, dtype=torch.int32, device=META),
                                       torch.zeros(nnz, device=META), (n, width), check_invariants=False)

    return {keys.RNA: counts(n_genes), keys.ATAC: counts(n_regions), keys.MASK: torch.ones(n, 2, dtype=torch.bool,
                                                                                            device=META),
            keys.BATCH: torch.zeros(n, dtype=torch.long, device=META),
            keys.CAT_COVS: torch.zeros(n, 1, dtype=torch.long, device=META),
            keys.CONT_COVS: torch.empty(n, 1, device=META), keys.INDEX: torch.arange(n, device=META),
            keys.SIZE_FACTOR: torch.empty(n, 2, device=META)}


def small_module(**options) -> MultiVAE:
    torch.manual_seed(0)
    return MultiVAE(30, 80, n_batch=2, n_cats_per_cov=[3], n_continuous_cov=1, n_obs=24, **options)


# -------------------------------------------------------------------- no CPU tensor on another device
OPTIONS = [{}, {"gene_likelihood": "nb"}, {"gene_likelihood": "poisson"}, {"dispersion": "gene-batch"},
           {"dispersion": "gene-cell"}, {"latent_distribution": "ln"}, {"modality_weights": "cell"},
           {"modality_penalty": "MMD"}, {"use_size_factor": True}, {"use_batch_norm": "both"},
           {"encode_covariates": True, "deeply_inject_covariates": True}, {"region_factors": False}]


@pytest.fixture
def meta_nonzero():
    """``nonzero`` on meta tensors (the measured-row selection and dense Bernoulli need it): all rows."""
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("csr", [False, True], ids=["dense", "csr"])
def test_loss_and_backward_create_no_cpu_tensor_on_another_device(options, csr, meta_nonzero):
    """Every tensor the loss makes (noise, placeholders, row indices, covariates, the native-kernel
    dispatch's fallbacks) is made on the batch's device: on meta a CPU tensor raises, as on CUDA."""
    module = small_module(dropout_rate=0.0, **options).to(META)
    for skip in (False, True):
        module.skip_unmeasured = module.skip_unmeasured_encoders = skip
        out = module.loss(meta_batch(csr), kl_weight=0.5)
        out.loss.backward()
        assert out.loss.device == META and out.recon_atac.device == META


@pytest.mark.parametrize("options", [{}, {"latent_distribution": "ln"}, {"encode_covariates": True}],
                         ids=["default", "ln", "encode_covariates"])
@pytest.mark.parametrize("csr", [False, True], ids=["dense", "csr"])
def test_every_predictor_runs_on_the_batch_s_device(options, csr, meta_nonzero):
    """The inference jobs' math (trainer.predict) on a non-CPU device, feature subsets and lists of
    batches included. ``ln`` latents raised here: ``ln_mean`` asked the device for a random generator."""
    module = small_module(**options).to(META).eval()
    b = meta_batch(csr)
    results = [
        predict.latent(module, b),
        predict.latent(module, b, "rna", give_mean=False, n_samples=2),
        predict.normalized_expression(module, b, transform_batch=[0, 1], library_size=1e4, gene_index=[3, 1]),
        predict.normalized_expression(module, b, library_size="observed", n_samples=2, use_z_mean=False),
        predict.normalized_accessibility(module, b, transform_batch=1, normalize_cells=True,
                                         normalize_regions=True, region_index=[5, 2]),
    ]
    assert all(r.device == META for r in results)


# ------------------------------------------------------------------------------------ native kernels
@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_native_dispatch_takes_the_eager_path_for_other_dtypes(dtype):
    """The C kernels read float32 CPU memory: any other dtype (DeepSpeed's bf16 weights, autocast's
    halves, the float64 parity runs) or device must not reach them, and gets the eager result."""
    g = torch.Generator().manual_seed(1)
    x = ((torch.rand(9, 50, generator=g) < 0.05) * torch.randint(1, 4, (9, 50), generator=g)).float().to_sparse_csr()
    w = torch.randn(50, 6, generator=g)
    assert native_ops.available(x, w)
    assert not native_ops.available(x, w.to(dtype))
    assert not native_ops.available(x.to(META), w.to(META))
    xs, ws = x.to(dtype), w.to(dtype)
    torch.testing.assert_close(input_matmul_t(xs, ws, native=True), _CsrMatmul.apply(xs, ws), rtol=0, atol=0)
    dense = ((torch.rand(9, 50, generator=g) < 0.5) * 2.0).to_sparse_csr()  # above DENSIFY_ABOVE: densified
    assert native_ops.csr_to_dense(dense.to(dtype)).dtype == dtype
    torch.testing.assert_close(native_ops.csr_to_dense(dense.to(dtype)), dense.to(dtype).to_dense(), rtol=0, atol=0)


@needs_native
def test_native_dense_copy_stays_on_the_cpu_under_another_default_device():
    """``csr_to_dense`` allocated its output on torch's default device: under
    ``torch.set_default_device("cuda")`` (or "meta") the C scatter wrote through a non-CPU pointer and
    the process died (SIGSEGV)."""
    res = _python(
        "import torch\n"
        "from trainer.native import ops\n"
        "x = ((torch.rand(6, 40) < 0.5) * 3.0).to_sparse_csr()\n"
        "want = x.to_dense()\n"
        "assert ops.available(x)\n"
        "torch.set_default_device('meta')\n"
        "out = ops.csr_to_dense(x)\n"
        "assert out.device.type == 'cpu' and torch.equal(out, want), out.device\n"
        "print('ok')\n")
    assert res.returncode == 0 and "ok" in res.stdout, (res.returncode, res.stderr[-2000:])


@needs_native
def test_native_self_check_runs_on_the_cpu_whatever_the_default_device():
    """The self-check built its test tensors on the default device: under another one it failed and
    switched the kernels off for the whole process (a warning, then every CPU step on the slow path)."""
    res = _python(
        "import torch\n"
        "torch.set_default_device('meta')\n"
        "from trainer import native\n"
        "print('lib', native.library() is not None, native.why_unavailable())\n")
    assert res.returncode == 0 and "lib True None" in res.stdout, (res.stdout, res.stderr[-2000:])


# ------------------------------------------------------------------------------------------ inference
def test_ln_mean_draws_come_from_the_cpu_generator_on_every_device():
    """E[softmax(z)] of an ``ln`` latent uses fixed draws (seed 0). They came from a generator on the
    tensors' device: CUDA's stream gave a GPU job other numbers than a CPU job (and the meta device,
    which has no generator, raised). Now: the CPU draws, moved, on every device."""
    g = torch.Generator().manual_seed(3)
    m, v = torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g) + 0.1
    eps = torch.randn(predict.LN_MEAN_DRAWS, 4, generator=torch.Generator().manual_seed(0))
    want = torch.softmax(m.unsqueeze(0) + eps.unsqueeze(1) * v.sqrt().unsqueeze(0), dim=-1).mean(0)
    torch.testing.assert_close(predict.ln_mean(m, v), want, rtol=1e-6, atol=1e-7)
    assert predict.ln_mean(m.to(META), v.to(META)).device == META


def test_accessibility_region_normalisation_is_fp32_for_a_bf16_module():
    """``normalize_regions`` multiplied by sigmoid(region factors) computed in the module's dtype: for a
    bf16 module (DeepSpeed bf16's) that factor was rounded to bf16 (~0.4 % off); the heads and the loss
    read it in float32 (``MultiVAE.region_factor_probs``)."""
    module = small_module().eval()
    with torch.no_grad():
        module.region_factors.copy_(torch.linspace(-3, 3, 80))
    module = module.to(torch.bfloat16)
    b = to_csr(cpu_batch())
    p = predict.normalized_accessibility(module, b)
    normalized = predict.normalized_accessibility(module, b, normalize_regions=True)
    assert p.dtype == normalized.dtype == torch.float32
    want = p * torch.sigmoid(module.region_factors.float())
    torch.testing.assert_close(normalized, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("csr", [False, True], ids=["dense", "csr"])
def test_predictions_under_bf16_autocast_are_finite_float32(csr):
    """An API user who wraps inference in autocast gets float32, finite results close to fp32 ones: the
    heads return float32 and nothing after them runs in bf16."""
    module = small_module().eval()
    b = cpu_batch()
    b = to_csr(b) if csr else b
    fns = {"latent": lambda: predict.latent(module, b),
           "expression": lambda: predict.normalized_expression(module, b, library_size=1e4),
           "accessibility": lambda: predict.normalized_accessibility(module, b, normalize_cells=True)}
    for name, fn in fns.items():
        full = fn()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fn()
        assert low.dtype == torch.float32 and torch.isfinite(low).all(), name
        torch.testing.assert_close(low, full, rtol=0.1, atol=0.05 * float(full.abs().max())), name


# --------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from data.store import open_store
    from tests.train_utils import tiny_config, tiny_store

    root = tmp_path_factory.mktemp("device")
    store = tiny_store(root / "store", n_cells=200)
    return open_store(store).meta, tiny_config(store, root / "run"), root


def test_a_bf16_module_exports_float32_and_loads_on_the_cpu(tiny):
    """DeepSpeed bf16 trains an all-bf16 module; its export must be float32 CPU tensors (the format
    every consumer and scvi-tools reads), and load back as a float32 module with the same values."""
    from trainer.export import build_module, export_model, load_model, weights_of

    meta, cfg, root = tiny
    module = build_module(meta, cfg).to(torch.bfloat16)
    out = export_model(weights_of(module), meta, cfg, root / "bf16-model")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    assert dtypes == {"F32"}
    loaded, _ = load_model(out)
    for name, t in loaded.state_dict().items():
        assert t.device.type == "cpu" and t.dtype == torch.float32, name
        torch.testing.assert_close(t, module.state_dict()[name].float(), rtol=0, atol=0)


def test_weights_written_in_another_dtype_load_as_float32(tiny):
    """A model file whose tensors are bf16 (another tool's export of a bf16 run) loads into the float32
    module: safetensors keep no device, and load_state_dict casts."""
    from trainer.export import INFO, WEIGHTS, build_module, export_model, load_model, weights_of

    meta, cfg, root = tiny
    module = build_module(meta, cfg)
    out = export_model(weights_of(module), meta, cfg, root / "bf16-file")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights_of(module).items()}, str(out / WEIGHTS))
    assert json.loads((out / INFO).read_text())["model_args"]
    loaded, _ = load_model(out)
    for name, t in loaded.state_dict().items():
        assert t.dtype == torch.float32, name
        torch.testing.assert_close(t, module.state_dict()[name].to(torch.bfloat16).float(), rtol=0, atol=0)
