"""Mixed precision: ``dist.precision`` -> autocast, and a model that stays fp32 where it matters.

Autocast runs the Linear layers in bf16; the heads (``trainer.nn.head``) bring their outputs back to
the parameter dtype, so the likelihoods, KL and loss are fp32 on every path (native kernels, eager,
compiled; CSR or dense input). Before the heads did that, the eager ATAC likelihood's backward
crashed under autocast (bf16 probabilities against an fp32 library), i.e. ``precision=bf16`` on a
GPU could not train. CPU autocast exercises the same dtype logic, so these run here.

    .venv/bin/python -m pytest tests/test_precision.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from data import keys
from tests.train_utils import tiny_config, tiny_store
from trainer import module_loss
from trainer.classifier import BatchClassifier, build_classifier
from trainer.config import DistConfig
from trainer.metrics import read_metrics
from trainer.module import MultiVAE
from trainer.parallel import DeepSpeedWrapped, Wrapped
from trainer.precision import autocast_dtype, cpu_has_native_bf16, deepspeed_bf16
from trainer.step import build_optimizers, train_step, vae_objective
from trainer.train import train

BF16_CPU = cpu_has_native_bf16()


def test_precision_maps_to_autocast_per_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("fp32", gpu) is None
    assert autocast_dtype("bf16", gpu) is torch.bfloat16 and autocast_dtype("fp16", gpu) is torch.float16
    assert autocast_dtype("fp16", cpu) is None  # no fp16 autocast on the CPU: fp32
    assert autocast_dtype("bf16", cpu) is (torch.bfloat16 if BF16_CPU else None)


def test_deepspeed_never_autocasts_and_says_why_on_the_cpu(capfd):
    """DeepSpeed casts the module to bf16 itself (no autocast): on a GPU, and on a CPU with native bf16 GEMMs
    (the autocast rule); on other CPUs it trains fp32 and says so."""
    bf16 = DistConfig(backend="deepspeed", precision="bf16")
    assert DeepSpeedWrapped._autocast_dtype(None, bf16, torch.device("cpu")) is None
    said = "DeepSpeed: precision=bf16 needs a GPU or a CPU with native bf16; training in fp32" in capfd.readouterr().out
    assert said is not BF16_CPU
    assert deepspeed_bf16("bf16", torch.device("cpu")) is BF16_CPU
    assert deepspeed_bf16("bf16", torch.device("cuda", 0)) and not deepspeed_bf16("fp32", torch.device("cuda", 0))
    assert DeepSpeedWrapped._autocast_dtype(None, bf16, torch.device("cuda", 0)) is None  # it casts itself
    assert Wrapped._autocast_dtype(None, bf16, torch.device("cpu")) is (torch.bfloat16 if BF16_CPU else None)


@pytest.fixture(scope="module")
def batch():
    """64 cells (30 paired, 17 RNA-only, 17 ATAC-only: 47 measure each modality, so CPU autocast pads
    them to 48), 200 genes, 1,000 regions, dense counts."""
    g, n = torch.Generator().manual_seed(0), 64
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[30:47, 1] = False
    mask[47:, 0] = False
    rna = (torch.rand(n, 200, generator=g) < 0.35) * (1 + torch.poisson(torch.full((n, 200), 1.5), generator=g))
    atac = (torch.rand(n, 1000, generator=g) < 0.05) * (1 + (torch.rand(n, 1000, generator=g) < 0.3))
    return {keys.RNA: (rna * mask[:, :1]).float(), keys.ATAC: (atac * mask[:, 1:]).float(), keys.MASK: mask,
            keys.BATCH: torch.randint(0, 2, (n,), generator=g), keys.CAT_COVS: torch.zeros(n, 0, dtype=torch.long),
            keys.CONT_COVS: torch.zeros(n, 0), keys.INDEX: torch.arange(n)}


def sparse(batch: dict) -> dict:
    return {**batch, keys.RNA: batch[keys.RNA].to_sparse_csr(), keys.ATAC: batch[keys.ATAC].to_sparse_csr()}


@pytest.mark.parametrize("layout", ["dense", "csr"])
@pytest.mark.parametrize("path", ["native", "eager", "compiled"])
def test_every_loss_path_under_bf16_autocast_is_fp32_and_close(batch, layout, path):
    x = sparse(batch) if layout == "csr" else batch
    torch.manual_seed(0)
    # no dropout: both passes must see the same network
    m = MultiVAE(200, 1000, n_batch=2, dropout_rate=0.0, native_kernels=path == "native",
                 compile_kernels=path == "compiled").train()
    eps = torch.randn(64, m.n_latent)
    ref = m.loss(x, 0.5, eps=eps)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    seen = []
    hook = m.atac_out.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.loss(x, 0.5, eps=eps)
    hook.remove()
    assert seen == [torch.bfloat16]  # the ATAC head's GEMM really ran in bf16 ...
    for t in (out.loss, out.recon_rna, out.recon_atac, out.kl, out.penalty, out.z):
        assert t.dtype == torch.float32  # ... and everything after the heads in fp32
    assert abs(float(out.loss.detach()) - float(ref.loss.detach())) < 2e-3 * abs(float(ref.loss.detach()))
    out.loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
        g, r = p.grad.flatten().double(), ref_grads[n].flatten().double()
        if r.norm() > 0:
            assert torch.nn.functional.cosine_similarity(g, r, dim=0) > 0.98, n


@pytest.mark.parametrize("layout", ["dense", "csr"])
@pytest.mark.parametrize("native", [True, False])
def test_an_all_bf16_module_scores_in_fp32(batch, layout, native):
    """DeepSpeed bf16 casts the weights themselves to bf16 (no autocast). The heads' outputs are then
    brought to fp32 too, and the float32 noise the trainer passes (``loop.step_noise``) enters the bf16
    decoders through a cast. Before: that noise made z float32 and the first decoder Linear raised
    (mat1 and mat2 must have the same dtype); with bf16 noise the recon terms were bf16, off by 2.5 %
    (ATAC) and 27 % (RNA, CSR) of the batch sum at 2,000 x 10,000 (outputs/prof/allbf16.py). Counts
    reach the likelihoods in float32: bf16 holds integers exactly only up to 256 (cell 0's 1001 would
    be scored as 1000: its recon 1e-3 off instead of 6e-6)."""
    big = dict(batch)
    big[keys.RNA] = batch[keys.RNA].clone()
    big[keys.RNA][0, :6] = torch.tensor([1001.0, 777.0, 513.0, 300.0, 2049.0, 999.0])  # cell 0 is paired
    x = sparse(big) if layout == "csr" else big
    torch.manual_seed(0)
    m32 = MultiVAE(200, 1000, n_batch=2, dropout_rate=0.0, native_kernels=native).train()
    with torch.no_grad():
        for p in m32.parameters():
            p.copy_(p.bfloat16().float())  # the same, bf16-representable weights in both
    m16 = MultiVAE(200, 1000, n_batch=2, dropout_rate=0.0, native_kernels=native).train()
    m16.load_state_dict(m32.state_dict())
    m16 = m16.to(torch.bfloat16)
    eps = torch.randn(64, m16.n_latent)  # float32, as loop.step_noise draws it
    cls = build_classifier(m32)  # float32 (DeepSpeed leaves the classifier outside the engine)
    ref = m32.loss(x, 0.5, eps=eps)
    total, out, adversarial = vae_objective(m16, cls, x, 0.5, eps=eps)
    for t in (total, out.recon_rna, out.recon_atac, out.kl, out.penalty, out.z, adversarial):
        assert t.dtype == torch.float32
    for term in ("recon_rna", "recon_atac", "kl"):
        a, b = getattr(out, term).detach().double().sum(), getattr(ref, term).detach().double().sum()
        assert abs(float(a - b)) < 2e-3 * abs(float(b)), term
    cell0 = ((out.recon_rna[0] - ref.recon_rna[0]).abs() / ref.recon_rna[0].abs()).detach()
    assert float(cell0) < 1e-4  # exact large counts (bf16 weights alone: ~6e-6 here)
    total.backward()
    for n, p in m16.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), n


OPTIONS = [
    {"n_cats_per_cov": [3], "n_continuous_cov": 2, "encode_covariates": True, "deeply_inject_covariates": True},
    {"n_continuous_cov": 1, "modality_weights": "cell", "n_obs": 32},
    {"use_size_factor": True},
    {"dispersion": "gene-batch"},
    {"gene_likelihood": "nb"},
    {"use_batch_norm": "both"},
]


@pytest.mark.parametrize("layout", ["dense", "csr"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o))
def test_module_options_train_with_bf16_weights(layout, options):
    """Covariates (one-hot and continuous, encoded, injected deep), per-cell modality weights, size
    factors, per-batch dispersion, NB, batch norm: each path takes bf16 weights with float32 noise."""
    g, n = torch.Generator().manual_seed(0), 32
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[10:16, 1] = False
    mask[16:22, 0] = False
    rna = (torch.rand(n, 50, generator=g) < 0.35) * 2.0 * mask[:, :1]
    atac = (torch.rand(n, 300, generator=g) < 0.05) * 1.0 * mask[:, 1:]
    b = {keys.RNA: rna, keys.ATAC: atac, keys.MASK: mask, keys.BATCH: torch.randint(0, 2, (n,), generator=g),
         keys.CAT_COVS: torch.randint(0, 3, (n, 1), generator=g),
         keys.CONT_COVS: torch.randn(n, options.get("n_continuous_cov", 0), generator=g),
         keys.INDEX: torch.arange(n), keys.SIZE_FACTOR: torch.rand(n, 2, generator=g) + 0.5}
    if layout == "csr":
        b = sparse(b)
    m = MultiVAE(50, 300, n_batch=2, **options).to(torch.bfloat16).train()
    total, _, _ = vae_objective(m, build_classifier(m).float(), b, 0.5, eps=torch.randn(n, m.n_latent))
    assert total.dtype == torch.float32 and math.isfinite(float(total.detach()))
    total.backward()
    for name, p in m.named_parameters():
        assert p.grad is None or (p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()), name


def test_rows_are_bucketed_only_under_cpu_autocast():
    keep = torch.zeros(128, dtype=torch.bool)
    keep[torch.randperm(128, generator=torch.Generator().manual_seed(0))[:93]] = True
    exact = keep.nonzero().squeeze(1)
    assert torch.equal(module_loss.bucketed_rows(keep), exact)  # fp32: exactly the measured rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = module_loss.bucketed_rows(keep)
        assert torch.equal(module_loss.bucketed_rows(torch.ones(128, dtype=torch.bool)), torch.arange(128))
        big = torch.zeros(1024, dtype=torch.bool)
        big[:700] = True
        assert module_loss.bucketed_rows(big).numel() == 704  # multiple of 1024 // 16 = 64
    assert rows.numel() == 96 and bool((rows[1:] > rows[:-1]).all())  # 93 -> 96 (multiple of 16), sorted
    assert set(exact.tolist()) <= set(rows.tolist())


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_bucket_padding_changes_no_cell_s_terms(batch, layout, monkeypatch):
    """Under autocast, decoding 48 rows for 47 measured cells gives the same per-cell terms as decoding
    the 47 (up to the bf16 GEMMs' shape-dependent rounding), and exact zeros for unmeasured cells."""
    x = sparse(batch) if layout == "csr" else batch
    torch.manual_seed(0)
    m = MultiVAE(200, 1000, n_batch=2, dropout_rate=0.0).train()
    eps = torch.randn(64, m.n_latent)
    outs, grads = [], []
    for bucketed in (True, False):
        if not bucketed:
            monkeypatch.setattr(module_loss, "bucketed_rows", lambda keep: keep.nonzero().squeeze(1))
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.loss(x, 0.5, eps=eps)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    padded, plain = outs
    assert padded.outputs["rna_rows"].numel() == 48 and plain.outputs["rna_rows"].numel() == 47
    mask = batch[keys.MASK]
    assert bool((padded.recon_rna[~mask[:, 0]] == 0).all()) and bool((padded.recon_atac[~mask[:, 1]] == 0).all())
    if layout == "dense":  # dense input: the encoders run on (bucketed) rows too; placeholders elsewhere
        for mod, col in (("rna", 0), ("atac", 1)):
            assert bool((padded.outputs[f"qzm_{mod}"][~mask[:, col]] == 0).all())
            assert bool((padded.outputs[f"qzv_{mod}"][~mask[:, col]] == 1).all())
    for term in ("recon_rna", "recon_atac", "kl", "penalty"):
        torch.testing.assert_close(getattr(padded, term), getattr(plain, term), rtol=1e-2, atol=1e-2)
    for n, g in grads[0].items():
        r = grads[1][n].flatten().double()
        if r.norm() > 0:
            assert torch.nn.functional.cosine_similarity(g.flatten().double(), r, dim=0) > 0.99, n


def test_train_step_with_amp_dtype_trains(batch):
    torch.manual_seed(0)
    m = MultiVAE(200, 1000, n_batch=2).train()
    cls = build_classifier(m)
    opts = build_optimizers(m, cls)
    x = sparse(batch)
    first = train_step(m, cls, *opts, x, kl_weight=0.5, amp_dtype=torch.bfloat16)
    for _ in range(30):
        last = train_step(m, cls, *opts, x, kl_weight=0.5, amp_dtype=torch.bfloat16)
    assert all(math.isfinite(v) for v in last.values())
    assert last["loss"] < first["loss"]  # 31 steps on one batch: the objective goes down


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no native bf16 GEMMs: precision=bf16 trains in fp32 here")
def test_bf16_run_on_the_cpu_uses_autocast_and_matches_fp32(tmp_path, capfd):
    store = tiny_store(tmp_path / "store")
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(store, tmp_path / precision, **{"dist.precision": precision, "run.epochs": 3})
        train(cfg)
        runs[precision] = read_metrics(tmp_path / precision / "metrics.jsonl")
    assert "precision=bf16: autocast on the CPU" in capfd.readouterr().out
    val = {k: [r["reconstruction_loss_validation"] for r in rows if r["kind"] == "validation"]
           for k, rows in runs.items()}
    assert len(val["bf16"]) == 3 and all(math.isfinite(v) for v in val["bf16"])
    # same seed, same cells: bf16 GEMMs change the numbers a little, not the training
    assert val["bf16"][-1] != val["fp32"][-1]
    assert abs(val["bf16"][-1] - val["fp32"][-1]) < 0.02 * abs(val["fp32"][-1])
    assert val["bf16"][-1] < val["bf16"][0]
    skipped = [r.get("skipped_steps", 0) for r in runs["bf16"] if r["kind"] == "train"]
    assert skipped and skipped[-1] == 0


def test_the_classifier_computes_in_its_own_dtype_under_autocast():
    """The adversary is outside autocast (six tiny GEMMs gain nothing from bf16, the casts cost ~0.6 ms
    of a CPU step) and casts z itself: a bf16 z (DeepSpeed bf16) meets an fp32 classifier."""
    torch.manual_seed(0)
    clf = BatchClassifier(10, 3).eval()
    z = torch.randn(64, 10)
    plain = clf(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = clf(z)
        from_bf16 = clf(z.bfloat16())
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
    assert from_bf16.dtype == torch.float32 and torch.equal(from_bf16, clf(z.bfloat16().float()))


def test_the_classifier_is_built_on_the_module_s_device_and_dtype():
    """build_classifier followed only the module's dtype: on a GPU the benchmark's classifier (built without
    `wrap`, which moves both) stayed on the CPU and its first step failed. The meta device stands in for a GPU
    here (no data, but every parameter says where it lives)."""
    m = MultiVAE(n_genes=6, n_regions=9, n_batch=2, n_hidden=8, n_latent=3).to(device="meta", dtype=torch.bfloat16)
    clf = build_classifier(m)
    assert {(p.device.type, p.dtype) for p in clf.parameters()} == {("meta", torch.bfloat16)}
