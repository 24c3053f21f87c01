"""``model.rna_library=lognormal``: a latent RNA log-library with a per-batch LogNormal prior (spec Part A.6;
scvi-tools' VAE with ``use_observed_lib_size=False``), trainer/library_prior.py and the module's loss.

    .venv/bin/python -m pytest tests/test_library_prior.py -q

* the prior's moments per model batch from a store's stats (pooled for batches without two RNA cells);
* the loss: the library KL per cell equals torch.distributions' Normal KL against the cell's batch prior, on
  RNA-measured cells only, not KL-warmed; the decoders read the reparameterised library draw (the noise's
  last column), the predictors' mean pass its posterior mean;
* a training run: the exported model holds the training store's moments, trains (held-out ELBO falls),
  embeds and reports its library, resumes exactly, refuses use_size_factor and the scvi-tools export;
* a query model keeps its reference's prior for the reference's batches and takes the new ones' from the
  query store.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.distributions import Normal, kl_divergence

from data import keys
from data.store import open_store
from tests.test_parity import load_pbmc_counts, make_batch
from tests.train_utils import tiny_config, tiny_store
from trainer.config import ConfigError, load_config
from trainer.library_prior import prior_moments, set_prior
from trainer.module import MultiVAE
from trainer.train import train

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

STATS = {"rna_cells_per_batch": np.array([10, 9, 0, 15]),
         "rna_library_log_mean": np.array([7.0, 9.0, 0.0, 8.0], np.float32),
         "rna_library_log_var": np.array([0.25, 0.0, 0.0, 0.0], np.float32)}


def test_prior_moments_per_model_batch():
    mean, var = prior_moments(STATS, ["a", "b", "c", "d"], ["d", "a", "new", "b", "c"])
    pooled_m = (10 * 7 + 9 * 9 + 15 * 8) / 34
    pooled_v = (10 * (0.25 + 49) + 9 * 81 + 15 * 64) / 34 - pooled_m**2
    np.testing.assert_allclose(mean, [8.0, 7.0, pooled_m, pooled_m, pooled_m], rtol=1e-6)
    # "d": 15 identical libraries -> the floor; "b" (9 cells: too few), "c" (none), "new" (not in the store) pooled
    np.testing.assert_allclose(var, [1e-4, 0.25, pooled_v, pooled_v, pooled_v], rtol=1e-6)
    mean, var = prior_moments({**STATS, "rna_cells_per_batch": np.zeros(4)}, list("abcd"), ["a"])
    assert (mean, var) == ([0.0], [1.0])  # no RNA cell at all: finite, and it scores no cell


@pytest.fixture(scope="module")
def module_and_batch():
    torch.manual_seed(0)
    module = MultiVAE(45, 174, n_batch=2, rna_library="lognormal").double().eval()  # no dropout: calls compare
    with torch.no_grad():
        module.library_log_mean.copy_(torch.tensor([6.5, 7.5]))
        module.library_log_var.copy_(torch.tensor([0.3, 0.6]))
    return module, make_batch(load_pbmc_counts())


def test_library_kl_is_the_normal_kl_on_rna_cells_and_not_warmed(module_and_batch):
    module, batch = module_and_batch
    eps = torch.randn(12, module.n_noise, dtype=torch.float64)
    out = module.loss(batch, kl_weight=0.0, eps=eps)
    inf = out.outputs
    b = batch[keys.BATCH].reshape(-1).long()
    prior = Normal(module.library_log_mean[b].double(), module.library_log_var[b].double().sqrt())
    post = Normal(inf["qlm_rna"][:, 0], inf["qlv_rna"][:, 0].sqrt())
    want = torch.where(batch[keys.MASK][:, 0], kl_divergence(post, prior), torch.zeros(12, dtype=torch.float64))
    torch.testing.assert_close(out.kl_library, want, rtol=1e-12, atol=0)
    assert (out.kl_library[batch[keys.MASK][:, 0]] > 0).all()
    # kl_weight 0 leaves the library's KL in the loss (scvi-tools' kl_local_no_warmup), and ``kl`` reports it
    torch.testing.assert_close(out.loss, (out.recon_rna + out.recon_atac + out.penalty + out.kl_library).mean())
    z_only = module.loss(batch, kl_weight=1.0, eps=eps)
    torch.testing.assert_close(z_only.loss, (out.recon_rna + out.recon_atac + out.penalty + out.kl).mean())


def test_decoders_read_the_draw_and_the_mean_pass_the_mean(module_and_batch):
    module, batch = module_and_batch
    eps = torch.randn(12, module.n_noise, dtype=torch.float64)
    inf = module.inference(batch, eps=eps)
    draw = inf["qlm_rna"] + eps[:, -1:] * inf["qlv_rna"].sqrt()
    torch.testing.assert_close(inf["lib_rna"], draw, rtol=0, atol=0)
    assert (inf["qlv_rna"] >= 1e-4).all()
    gen = module.generative(inf["z"], batch, inf["lib_rna"])
    torch.testing.assert_close(gen["px_rate"], torch.exp(draw) * gen["px_scale"])
    mean_pass = module.inference(batch, eps=torch.zeros(12, module.n_noise, dtype=torch.float64))
    torch.testing.assert_close(mean_pass["lib_rna"], mean_pass["qlm_rna"], rtol=0, atol=0)
    # noise with z's columns only is refused: the trainer once passed such noise and the library sat at its mean
    with pytest.raises(ValueError, match=r"eps has 3 columns, the module needs n_noise=4 \(n_latent 3 \+ 1 for"):
        module.loss(batch, eps=torch.zeros(12, module.n_latent, dtype=torch.float64))
    # the posterior itself does not depend on the noise
    torch.testing.assert_close(mean_pass["qlm_rna"], inf["qlm_rna"], rtol=0, atol=0)


def test_size_factor_and_lognormal_refused():
    with pytest.raises(ConfigError, match="rna_library=lognormal needs the library network"):
        load_config({"data": {"store": "x"}, "model": {"rna_library": "lognormal", "use_size_factor": True}})
    with pytest.raises(ConfigError, match=r"rna_library must be one of \['deterministic', 'lognormal'\]"):
        load_config({"data": {"store": "x"}, "model": {"rna_library": "observed"}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lognormal")
    store = tiny_store(root / "store")
    cfg = tiny_config(store, root / "run", **{"model.rna_library": "lognormal", "run.epochs": 3})
    return store, root, train(cfg)


def test_training_run_exports_the_store_prior_and_learns(trained):
    store, _, result = trained
    weights = load_file(str(Path(result.model_dir) / "model.safetensors"))
    stats = open_store(store).read_stats()
    np.testing.assert_allclose(weights["library_log_mean"].numpy(), stats["rna_library_log_mean"], rtol=1e-6)
    np.testing.assert_allclose(weights["library_log_var"].numpy(), stats["rna_library_log_var"], rtol=1e-6)
    assert "rna_encoder.lib_var.weight" in weights
    info = json.loads((Path(result.model_dir) / "model.json").read_text())
    assert info["model_args"]["rna_library"] == "lognormal"
    recs = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    elbo = [r["elbo_validation"] for r in recs if "elbo_validation" in r]
    assert len(elbo) == 3 and elbo[-1] < 0.8 * elbo[0] and all(np.isfinite(elbo))
    vals = [r for r in recs if "elbo_validation" in r]  # the library's part of kl_validation, reported alone
    assert all(0 < r["kl_library_validation"] < r["kl_validation"] for r in vals)
    steps = [r for r in recs if r.get("kind") == "train"]  # the library's KL logged as a term of its own (in kl too)
    assert steps and all(0 < r["kl_library"] < r["kl"] for r in steps)


def test_model_embeds_and_reports_its_library(trained):
    from trainer.api import load

    store, _, result = trained
    model = load(result.model_dir)
    z = model.latent(str(store))
    assert z.shape[1] == 6 and np.isfinite(z).all()
    lib = model.library_size_factors(str(store))["expression"]
    assert lib.shape == (z.shape[0],) and np.isfinite(lib).all()  # the posterior mean of each log-library


def test_scvi_export_refused(trained, tmp_path):
    from trainer.scvi_io import ScviIOError, export_to_scvi

    with pytest.raises(ScviIOError, match="rna_library=lognormal: scvi-tools' MULTIVI has only the deterministic"):
        export_to_scvi(trained[2].model_dir, tmp_path / "scvi")
    assert not (tmp_path / "scvi").exists()


def test_resume_is_exact(trained, tmp_path):
    store = trained[0]
    over = {"model.rna_library": "lognormal", "run.epochs": 2, "run.checkpoint_every_steps": 5}
    whole = train(tiny_config(store, tmp_path / "whole", **over))
    train(tiny_config(store, tmp_path / "cut", **over, **{"run.max_steps": 12}))
    resumed = train(tiny_config(store, tmp_path / "cut", **over))
    a = load_file(str(Path(whole.model_dir) / "model.safetensors"))
    b = load_file(str(Path(resumed.model_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_query_keeps_reference_prior_and_takes_new_batches_from_the_store(trained):
    from trainer.config import QueryConfig
    from trainer.query import Reference, start_from_reference, trainable_masks

    store, _, result = trained
    ref_weights = load_file(str(Path(result.model_dir) / "model.safetensors"))
    info = json.loads((Path(result.model_dir) / "model.json").read_text())
    s = open_store(store)
    ref_batches = list(info["batch_categories"])
    # a query model whose batch list is the reference's two, then two the reference never saw
    new = ["new_a", "new_b"]
    args = {**info["model_args"], "n_batch": len(ref_batches) + len(new)}
    module = MultiVAE(**args)
    # the store's cells, seen as the new batches (its categories renamed)
    query_store = SimpleNamespace(meta=SimpleNamespace(batch_categories=new), read_stats=s.read_stats)
    set_prior(module, query_store, ref_batches + new)
    start_from_reference(module, Reference(path=result.model_dir, info=info, state=ref_weights))
    stats = s.read_stats()
    assert ref_batches and module.n_batch == len(ref_batches) + 2
    np.testing.assert_allclose(module.library_log_mean[:2].numpy(), ref_weights["library_log_mean"].numpy())
    np.testing.assert_allclose(module.library_log_mean[2:].numpy(), stats["rna_library_log_mean"], rtol=1e-6)
    np.testing.assert_allclose(module.library_log_var[2:].numpy(), stats["rna_library_log_var"], rtol=1e-6)
    # the library's variance head is frozen like its mean head (a Linear outside FCLayers: scvi-tools' rules)
    on, _ = trainable_masks(module, QueryConfig())
    assert not on["rna_encoder.lib_var.weight"] and not on["rna_encoder.lib_out.weight"]
    assert on["rna_decoder.linears.0.weight"]  # the covariate columns of the first decoder layer train


def test_training_draws_the_library_so_its_posterior_narrows_below_the_prior(trained, tmp_path):
    """The trainer once drew noise for z only: the library sat at its posterior mean in every step, so its
    variance learned nothing but the prior's (0.42 vs 0.015 with the draw on the BMMC cells; docs/quality.md).
    Drawn, the reconstruction pulls the posterior of each cell's log-library well inside its batch's prior."""
    from trainer import predict
    from trainer.api import load
    from trainer.api_sources import source

    store = trained[0]
    res = train(tiny_config(store, tmp_path / "run", **{"model.rna_library": "lognormal", "run.epochs": 4,
                                                        "optim.lr": 1e-2}))
    model = load(res.model_dir, device="cpu")
    prior_var = float(model.module.library_log_var.mean())
    _, _, batch = next(iter(source(model, str(store), None, 2000).batches()))
    inf = predict.mean_pass(model.module, batch)
    rna = inf["mask"][:, 0]
    assert float(inf["qlv_rna"][rna].mean()) < 0.3 * prior_var
    assert abs(float(inf["qlm_rna"][rna].mean()) - float(model.module.library_log_mean.mean())) < 0.5


def test_a_two_process_run_trains_a_lognormal_library(trained, tmp_path):
    """torchrun, 2 processes (gloo): the prior buffers are the store's on the exported model, and validation (keyed
    noise of n_noise columns on each rank) is finite and falls."""
    from tests.train_utils import tiny_overrides, train_cli

    store = trained[0]
    train_cli(tiny_overrides(store, tmp_path / "ddp", **{"model.rna_library": "lognormal", "run.epochs": 4,
                                                         "optim.lr": 1e-2}), nproc=2)
    weights = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    stats = open_store(store).read_stats()
    np.testing.assert_allclose(weights["library_log_mean"].numpy(), stats["rna_library_log_mean"], rtol=1e-6)
    recs = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    elbo = [r["elbo_validation"] for r in recs if "elbo_validation" in r]
    assert len(elbo) == 4 and all(np.isfinite(elbo)) and elbo[-1] < elbo[0]
