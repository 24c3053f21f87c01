"""mva-infer job=embed: a model trained by the real trainer on a real store, embedded chunk by chunk.

    .venv/bin/python -m pytest tests/test_infer_embed.py -q            # (-m 'not slow' skips torchrun)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import zarr

from data import keys
from data.store import open_store
from data.synthetic import write_synthetic_store
from data.typed_config import ConfigError
from tests.infer_utils import BATCH, N_CELLS, infer_cfg, read_obsm, reference_model, trained_model
from tests.train_utils import PY, ROOT, env, torchrun
from trainer.export import load_model
from trainer.infer import infer
from trainer.infer_config import EmbedOptions, load_infer_config
from trainer.jobs.common import InferError
from trainer.jobs.embed import FAIL_AFTER_ENV
from trainer.predict import latent

_cfg = infer_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


def _in_memory_latents(store_path, model_dir):
    """Every cell in one dense batch built straight from the store's CSR rows and obs (no loader)."""
    module, info = load_model(model_dir)
    st = open_store(store_path)
    obs = st.read_obs()
    mats = {m: sp.vstack([st.read_rows(m, s, 0, st.meta.shard_offsets[s + 1] - st.meta.shard_offsets[s])
                          for s in range(st.meta.n_shards)]).toarray() for m in keys.MODALITIES}
    n = len(obs)
    batch = {keys.RNA: torch.tensor(mats[keys.RNA], dtype=torch.float32),
             keys.ATAC: torch.tensor(mats[keys.ATAC], dtype=torch.float32),
             keys.MASK: torch.tensor(np.stack([obs["mask_rna"].to_numpy(bool), obs["mask_atac"].to_numpy(bool)], 1)),
             keys.BATCH: torch.tensor(obs[info["batch_key"]].cat.codes.to_numpy(np.int64)),
             keys.CAT_COVS: torch.zeros(n, 0, dtype=torch.long), keys.CONT_COVS: torch.zeros(n, 0)}
    with torch.no_grad():
        inf = module.inference(batch, eps=torch.zeros(n, module.n_latent))
    # joint: the module's own posterior mean; per modality: the notebook API (trainer.predict.latent)
    return obs, {"X_multivi": inf["qz_m"].numpy(), "X_multivi_expression": latent(module, batch, "rna").numpy(),
                 "X_multivi_accessibility": latent(module, batch, "atac").numpy()}


def test_embed_equals_in_memory_latents_and_opens_in_scanpy(trained, tmp_path):
    store, run = trained
    out = tmp_path / "emb.zarr"
    summary = infer(_cfg(store, run, out))
    assert summary["n_chunks"] == 8 and summary["chunks_written"] == 8 and summary["chunks_skipped"] == 0
    assert not (tmp_path / "emb.zarr.partial").exists() and not (tmp_path / "emb.zarr.progress").exists()
    assert zarr.open_group(str(out), mode="r").attrs["mva_complete"] is True

    adata = ad.read_zarr(str(out))
    obs, expected = _in_memory_latents(store, run / "model")
    assert adata.n_obs == N_CELLS
    pd.testing.assert_frame_equal(adata.obs, obs)  # copied in store order, dtypes and categories kept
    assert set(adata.obsm) == set(expected)
    for k, v in expected.items():
        got = np.asarray(adata.obsm[k])
        assert got.shape == (N_CELLS, 6) and got.dtype == np.float32
        np.testing.assert_allclose(got, v, rtol=1e-4, atol=1e-5, err_msg=k)
    assert np.abs(expected["X_multivi"] - expected["X_multivi_expression"]).max() > 1e-3  # distinct latents

    import scanpy as sc

    sc.pp.neighbors(adata, use_rep="X_multivi", n_neighbors=10)
    assert adata.obsp["connectivities"].shape == (N_CELLS, N_CELLS)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_embed_equals_the_reference_latents(trained, tmp_path):
    """scvi-tools' get_latent_representation (joint and per modality) with our weights on the same cells."""
    store, run = trained
    model, mdata = reference_model(store, run / "model")
    out = tmp_path / "emb.zarr"
    infer(_cfg(store, run, out))
    got = read_obsm(out)
    assert list(ad.read_zarr(str(out)).obs_names) == list(mdata.obs_names)
    for modality, key in (("joint", "X_multivi"), ("expression", "X_multivi_expression"),
                          ("accessibility", "X_multivi_accessibility")):
        ref = model.get_latent_representation(modality=modality)
        np.testing.assert_allclose(got[key], ref, rtol=1e-4, atol=1e-5, err_msg=modality)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("latent_distribution", ["normal", "ln"])
def test_return_dist_equals_the_references_and_the_api(tmp_path_factory, tmp_path, latent_distribution):
    """embed.return_dist / Model.latent(return_dist=True): each latent's posterior mean and variance, the
    reference's get_latent_representation(return_dist=True) (for ln: the normal's, before the softmax)."""
    from trainer.api import load

    store, run = trained_model(tmp_path_factory)
    if latent_distribution == "ln":
        from tests.train_utils import tiny_config
        from trainer.train import train

        run = Path(train(tiny_config(store, tmp_path / "run_ln", **{"model.latent_distribution": "ln"})).run_dir)
    model, _ = reference_model(store, run / "model")
    out = tmp_path / "emb.zarr"
    infer(_cfg(store, run, out, embed=EmbedOptions(return_dist=True)))
    got = read_obsm(out)
    api = load(run / "model")
    for modality, key in (("joint", "X_multivi"), ("expression", "X_multivi_expression"),
                          ("accessibility", "X_multivi_accessibility")):
        ref_m, ref_v = model.get_latent_representation(modality=modality, return_dist=True)
        m, v = got[f"{key}_qz_m"], got[f"{key}_qz_v"]
        np.testing.assert_allclose(m, ref_m, rtol=1e-4, atol=1e-5, err_msg=modality)
        np.testing.assert_allclose(v, ref_v, rtol=1e-4, atol=1e-7, err_msg=modality)
        assert (v > 0).all() and np.isfinite(m).all()
        api_m, api_v = api.latent(store, modality=modality, return_dist=True, batch_size=BATCH)
        np.testing.assert_allclose(api_m, m, rtol=1e-5, atol=1e-6, err_msg=modality)
        np.testing.assert_allclose(api_v, v, rtol=1e-5, atol=1e-8, err_msg=modality)
        if latent_distribution == "normal":  # the mean is the embedding itself
            np.testing.assert_array_equal(m, got[key])
        else:  # the embedding is E[softmax(z)], not the normal's mean
            assert np.abs(m - got[key]).max() > 1e-2
    emb = load(run / "model").latent(store, return_dist=True, as_anndata=True, batch_size=BATCH)
    assert set(emb.obsm) == {"X_multivi_qz_m", "X_multivi_qz_v"}


def test_crashed_run_resumes_to_the_clean_output(trained, tmp_path, monkeypatch):
    store, run = trained
    infer(_cfg(store, run, tmp_path / "clean.zarr"))
    clean = read_obsm(tmp_path / "clean.zarr")
    out = tmp_path / "emb.zarr"
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(_cfg(store, run, out))
    assert not out.exists() and (tmp_path / "emb.zarr.partial").is_dir()  # never marked complete
    assert len(list((tmp_path / "emb.zarr.progress").glob("chunk-*.done"))) == 3
    monkeypatch.delenv(FAIL_AFTER_ENV)
    # finished under another device setting: where it runs is not one of the output's settings
    summary = infer(_cfg(store, run, out, device="cpu"))
    assert summary["chunks_skipped"] == 3 and summary["chunks_written"] == 5
    got = read_obsm(out)
    adata = ad.read_zarr(str(out))
    assert adata.obs_names.is_unique and adata.n_obs == N_CELLS
    for k, v in clean.items():
        assert not np.isnan(got[k]).any(), k  # no missing rows (arrays start as NaN)
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_other_settings_refuse_an_unfinished_output_and_overwrite_replaces(trained, tmp_path, monkeypatch):
    store, run = trained
    out = tmp_path / "emb.zarr"
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    with pytest.raises(RuntimeError):
        infer(_cfg(store, run, out, modalities=["joint"]))
    monkeypatch.delenv(FAIL_AFTER_ENV)
    # the setting named with both values (it said only "different settings (['modalities'])"; a changed
    # expression.library_size only "(['expression'])")
    with pytest.raises(InferError, match=r"different settings \(modalities \(\['joint'\] -> \['joint', 'expression', "
                                         r"'accessibility'\]\)\) is in .*emb\.zarr\.progress; rerun with its settings to finish it"):
        infer(_cfg(store, run, out))
    infer(_cfg(store, run, out, overwrite=True))
    with pytest.raises(InferError, match="already exists"):
        infer(_cfg(store, run, out))
    assert set(read_obsm(out)) == {"X_multivi", "X_multivi_expression", "X_multivi_accessibility"}


def test_posterior_samples_have_a_sample_axis(trained, tmp_path):
    store, run = trained
    out = tmp_path / "s.zarr"
    infer(_cfg(store, run, out, give_mean=False, n_samples=3, modalities=["joint"]))
    z = read_obsm(out)["X_multivi"]
    assert z.shape == (N_CELLS, 3, 6) and not np.isnan(z).any()
    uns = ad.read_zarr(out).uns["multivi"]
    assert uns["seed"] == 0 and uns["batch_size"] == 96  # what the draws depend on is among the settings
    assert list(uns["modalities"]) == ["joint"] and not uns["return_dist"]  # what the output holds, from itself
    mean = _in_memory_latents(store, run / "model")[1]["X_multivi"]
    assert np.abs(z[:, 0] - z[:, 1]).max() > 1e-3  # independent draws around the mean
    assert np.abs(z.mean(1) - mean).mean() < np.abs(z[:, 0] - mean).mean()


def test_bad_inputs_give_one_clear_line(trained, tmp_path):
    store, run = trained
    with pytest.raises(InferError, match="does not exist"):
        infer(_cfg(store, tmp_path / "no_such_run", tmp_path / "a.zarr"))
    other = write_synthetic_store(tmp_path / "other", n_cells=50, n_genes=80, n_regions=300, progress=False)
    with pytest.raises(InferError, match=r"80 genes .* on 100 \(20 of the model's missing, e\.g\. \['gene_00080', 'gene_00081', 'gene_00082'\]\)") \
            as exc:
        infer(_cfg(other, run, tmp_path / "b.zarr"))
    assert "\n" not in str(exc.value)
    three = write_synthetic_store(tmp_path / "three", n_cells=50, n_genes=100, n_regions=300, n_batches=3,
                                  progress=False)
    with pytest.raises(InferError, match=r"store batches \['batch_2'\] are not among the model's"):
        infer(_cfg(three, run, tmp_path / "d.zarr"))
    with pytest.raises(ConfigError, match="job must be one of"):
        load_infer_config({"model_dir": str(run), "store": str(store), "output": "x", "job": "nope"})
    with pytest.raises(ConfigError, match="unknown config key: expression.bogus"):
        load_infer_config({"model_dir": str(run), "store": str(store), "output": "x", "expression": {"bogus": 1}})
    with pytest.raises(ConfigError, match="unknown config key"):
        load_infer_config({"model_dir": str(run), "store": str(store), "output": "x", "bogus": 1})
    # the CLI: exit status 2 and exactly one line on stderr, no traceback
    res = subprocess.run([PY, "-m", "trainer.infer", f"model_dir={run}", f"store={other}",
                          f"output={tmp_path / 'c.zarr'}"], check=False, cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mva-infer: error: store "), res.stderr[-2000:]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_in_cell_order(trained, tmp_path):
    store, run = trained
    infer(_cfg(store, run, tmp_path / "one.zarr"))
    torchrun(["-m", "trainer.infer", f"model_dir={run}", f"store={store}", f"output={tmp_path / 'two.zarr'}",
              f"batch_size={BATCH}", "progress=false"], nproc=2)
    one, two = ad.read_zarr(str(tmp_path / "one.zarr")), ad.read_zarr(str(tmp_path / "two.zarr"))
    pd.testing.assert_frame_equal(one.obs, two.obs)
    for k in one.obsm:
        np.testing.assert_allclose(np.asarray(two.obsm[k]), np.asarray(one.obsm[k]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_one_rank_crash_finished_by_two_ranks(trained, tmp_path, monkeypatch):
    """Chunks are global row ranges, so a rerun with another world size completes the same output."""
    store, run = trained
    infer(_cfg(store, run, tmp_path / "clean.zarr"))
    monkeypatch.setenv(FAIL_AFTER_ENV, "5")
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(_cfg(store, run, tmp_path / "emb.zarr"))
    monkeypatch.delenv(FAIL_AFTER_ENV)
    torchrun(["-m", "trainer.infer", f"model_dir={run}", f"store={store}", f"output={tmp_path / 'emb.zarr'}",
              f"batch_size={BATCH}", "progress=false"], nproc=2)
    clean, got = read_obsm(tmp_path / "clean.zarr"), read_obsm(tmp_path / "emb.zarr")
    for k, v in clean.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.slow
def test_umap_png_is_drawn_after_the_embedding(trained, tmp_path, capsys):
    store, run = trained
    png = tmp_path / "umap.png"
    summary = infer(_cfg(store, run, tmp_path / "emb.zarr", embed=EmbedOptions(umap_png=str(png))))
    assert png.is_file() and png.stat().st_size > 1000 and summary["umap"]["n_cells"] == N_CELLS
    assert capsys.readouterr().out.count(f"[embed] UMAP picture: {png}") == 1  # where it went was not said


@pytest.mark.parametrize("name", ["u", "u.jpg"])
def test_a_umap_picture_name_other_than_png_is_refused(name):
    # matplotlib takes the format from the name: "u" wrote u.png beside it, "u.jpg" a JPEG
    with pytest.raises(ConfigError, match=rf"embed.umap_png={name}: give the picture a .png name"):
        EmbedOptions(umap_png=name)


def test_each_modalitys_samples_do_not_depend_on_the_other_latents(trained, tmp_path):
    """Every modality draws from the chunk's seed: asking for more latents must not change one's samples."""
    store, run = trained
    infer(_cfg(store, run, tmp_path / "all.zarr", give_mean=False))
    infer(_cfg(store, run, tmp_path / "rna.zarr", give_mean=False, modalities=["expression"]))
    np.testing.assert_array_equal(read_obsm(tmp_path / "all.zarr")["X_multivi_expression"],
                                  read_obsm(tmp_path / "rna.zarr")["X_multivi_expression"])


def test_ln_latent_means_are_on_the_simplex(trained, tmp_path):
    """latent_distribution=ln: the reported mean is E[softmax(z)] (it was the raw Gaussian mean mu, off
    the simplex), equal to the average of many softmax samples."""
    from tests.train_utils import tiny_config
    from trainer.predict import ln_mean
    from trainer.train import train

    store, _ = trained
    res = train(tiny_config(store, tmp_path / "ln", **{"model.latent_distribution": "ln", "run.epochs": 1}))
    infer(_cfg(store, res.run_dir, tmp_path / "mean.zarr", modalities=["joint"]))
    z = read_obsm(tmp_path / "mean.zarr")["X_multivi"]
    np.testing.assert_allclose(z.sum(1), 1.0, rtol=1e-5)
    assert (z > 0).all()
    torch.manual_seed(0)
    m, v = torch.randn(4, 6), torch.rand(4, 6) + 0.5
    mc = torch.softmax(m + torch.randn(200_000, 4, 6) * v.sqrt(), dim=-1).mean(0)
    torch.testing.assert_close(ln_mean(m, v), mc, atol=0.025, rtol=0)  # 1,000 draws: MC sd <= ~0.008


def test_inference_functions_keep_every_tensor_on_the_batchs_device(trained):
    """No GPU here: the meta device makes the same cross-device check CUDA would. A CPU eps next to the
    posterior on the device raised on every inference job except the default embedding."""
    from tests.infer_utils import dense_batch
    from trainer import predict

    store, run = trained
    module, info = load_model(run / "model")
    b = {k: v[:10].to("meta") for k, v in dense_batch(store, info).items()}
    module = module.to("meta")
    assert predict.latent(module, b).device.type == "meta"
    assert predict.normalized_expression(module, b, library_size=1e4).device.type == "meta"
    assert predict.normalized_accessibility(module, b).device.type == "meta"


def test_overwrite_never_deletes_a_path_it_did_not_write(trained, tmp_path):
    """overwrite=true removes the whole tree at output: a mistyped output= naming a run directory (or a
    store) must be refused, not deleted."""
    store, run = trained
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "notes.txt").write_text("a week of work")
    with pytest.raises(InferError, match="is not an mva-infer output"):
        infer(_cfg(store, run, victim, overwrite=True))
    assert (victim / "notes.txt").read_text() == "a week of work"
    with pytest.raises(InferError, match="is not an mva-infer output"):
        infer(_cfg(store, run, store, overwrite=True))  # the store itself
    assert open_store(store).meta.n_cells == N_CELLS


def test_umap_png_that_cannot_be_drawn_is_refused_before_the_job(trained, tmp_path):
    store, run = trained
    png = EmbedOptions(umap_png=str(tmp_path / "u.png"))
    with pytest.raises(InferError, match="add 'joint' to modalities"):
        infer(_cfg(store, run, tmp_path / "a.zarr", modalities=["expression"], embed=png))
    with pytest.raises(InferError, match="give_mean=true or n_samples=1"):
        infer(_cfg(store, run, tmp_path / "b.zarr", give_mean=False, n_samples=3, embed=png))
    assert not any(tmp_path.glob("*.zarr*"))  # nothing was computed


def test_a_progress_directory_without_its_partial_output_starts_over(trained, tmp_path, monkeypatch):
    """Done markers with no <output>.partial (removed by hand, or a job killed between renaming it to the
    output and emptying <output>.progress, output removed since): the rerun starts over instead of
    failing on the missing Zarr group (GroupNotFoundError before)."""
    import shutil

    store, run = trained
    out = tmp_path / "emb.zarr"
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(_cfg(store, run, out))
    monkeypatch.delenv(FAIL_AFTER_ENV)
    shutil.rmtree(tmp_path / "emb.zarr.partial")
    summary = infer(_cfg(store, run, out))
    assert summary["chunks_written"] == summary["n_chunks"] and summary["chunks_skipped"] == 0
    infer(_cfg(store, run, tmp_path / "clean.zarr"))
    for k, v in read_obsm(tmp_path / "clean.zarr").items():
        np.testing.assert_array_equal(read_obsm(out)[k], v, err_msg=k)


def test_a_changed_setting_inside_a_section_is_named_by_its_key():
    from trainer.jobs.common import _differences

    old = {"expression": {"library_size": 1e9, "dtype": "float16"}, "n_cells": 5, "model_dir": "/m"}
    new = {"expression": {"library_size": 1.0, "dtype": "float16"}, "n_cells": 5, "model_dir": "/m" * 40}
    assert _differences(old, new) == ["expression.library_size (1000000000.0 -> 1.0)",
                                      f"model_dir ('/m' -> {repr('/m' * 40)[:57]}...)"]
