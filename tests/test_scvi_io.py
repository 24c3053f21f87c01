"""scvi-tools interchange (trainer/scvi_io.py, trainer/scvi_import.py, mva-infer job=export) against the
installed scvi-tools 1.5.1.

    .venv/bin/python -m pytest tests/test_scvi_io.py -q

A model trained by our trainer on a real store (with a categorical and a continuous covariate) is exported
and loaded by ``scvi.model.MULTIVI.load``; a MULTIVI trained by scvi-tools is imported and run by our
embed job and notebook API; a booby-trapped ``model.pt`` is refused without running its payload.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from data.typed_config import ConfigError
from tests.train_utils import tiny_config
from trainer import api
from trainer.export import INFO, WEIGHTS
from trainer.infer import infer
from trainer.infer_config import ExportOptions, InferConfig, load_infer_config
from trainer.jobs.common import InferError
from trainer.scvi_import import import_from_scvi, read_scvi_checkpoint
from trainer.scvi_io import ScviIOError, store_to_mudata
from trainer.train import train

N_CELLS = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from data.synthetic import write_synthetic_store

    root = tmp_path_factory.mktemp("scvi_io")
    store = write_synthetic_store(root / "store", n_cells=N_CELLS, n_genes=100, n_regions=300, progress=False,
                                  with_covariates=True)
    res = train(tiny_config(store, root / "run"))
    return store, Path(res.run_dir)


@pytest.fixture(scope="module")
def scvi_trained(trained, tmp_path_factory):
    """A MULTIVI trained by scvi-tools itself (2 epochs) on the same store's cells, saved to disk."""
    import scvi

    store, _ = trained
    mdata = store_to_mudata(store)
    scvi.settings.seed = 0
    scvi.model.MULTIVI.setup_mudata(mdata, batch_key="batch", categorical_covariate_keys=["site"],
                                    continuous_covariate_keys=["pct_mito"],
                                    modalities={"rna_layer": "rna", "atac_layer": "atac"})
    model = scvi.model.MULTIVI(mdata, n_hidden=24, n_latent=5)
    model.train(max_epochs=2, accelerator="cpu", batch_size=128, enable_progress_bar=False)
    out = tmp_path_factory.mktemp("scvi") / "multivi"
    model.save(str(out))
    return out, model


def _export_cfg(out, **kw) -> InferConfig:
    return InferConfig(job="export", output=str(out), progress=False, **kw)


def _embed(store, model_dir, out) -> np.ndarray:
    infer(InferConfig(model_dir=str(model_dir), store=str(store), output=str(out), batch_size=128, progress=False,
                      modalities=["joint"]))
    return np.asarray(ad.read_zarr(str(out)).obsm["X_multivi"])


def test_exported_model_loads_in_scvi_and_gives_our_numbers(trained, tmp_path):
    import scvi

    store, run = trained
    out = tmp_path / "for_scvi"
    infer(_export_cfg(out, model_dir=str(run), store=str(store), export=ExportOptions(direction="to_scvi")))
    assert (out / "model.pt").is_file() and not list(tmp_path.glob(".for_scvi.tmp-*"))

    ref = scvi.model.MULTIVI.load(str(out), adata=store_to_mudata(store))
    ours = api.load(run)
    z_job = _embed(store, run, tmp_path / "emb.zarr")
    np.testing.assert_allclose(ref.get_latent_representation(), z_job, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref.get_latent_representation(modality="accessibility"),
                               ours.latent(store, modality="accessibility"), rtol=1e-4, atol=1e-5)
    for tb in (None, "batch_1"):
        np.testing.assert_allclose(ref.get_normalized_expression(return_numpy=True, transform_batch=tb),
                                   ours.expression(store, transform_batch=tb), rtol=1e-4, atol=1e-7, err_msg=str(tb))
    np.testing.assert_allclose(
        ref.get_normalized_accessibility(return_numpy=True, normalize_cells=True, normalize_regions=True),
        ours.accessibility(store, normalize_cells=True, normalize_regions=True), rtol=1e-4, atol=1e-7)
    # the registry carries the store's categories and covariates, read back by scvi-tools
    reg = ref.registry["field_registries"]
    assert list(reg["batch"]["state_registry"]["categorical_mapping"]) == ["batch_0", "batch_1"]
    assert list(reg["extra_continuous_covs"]["state_registry"]["columns"]) == ["pct_mito"]

    with pytest.raises(InferError, match="already exists"):
        infer(_export_cfg(out, model_dir=str(run), store=str(store)))


def test_scvi_trained_model_imports_and_our_jobs_reproduce_it(trained, scvi_trained, tmp_path):
    store, _ = trained
    scvi_dir, ref = scvi_trained
    ours_dir = tmp_path / "imported"
    infer(_export_cfg(ours_dir, model_dir="-", store="-",
                      export=ExportOptions(direction="from_scvi", source=str(scvi_dir))))
    assert (ours_dir / WEIGHTS).is_file() and (ours_dir / INFO).is_file()

    adata = store_to_mudata(store)
    z_ref = ref.get_latent_representation(adata)
    np.testing.assert_allclose(_embed(store, ours_dir, tmp_path / "emb.zarr"), z_ref, rtol=1e-4, atol=1e-5)
    model = api.load(scvi_dir)  # the API imports a scvi-tools directory on the fly
    assert model.module.n_latent == 5 and model.info["cat_cov_keys"] == ["site"]
    np.testing.assert_allclose(model.latent(adata), z_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.expression(store, transform_batch="batch_0"),
                               ref.get_normalized_expression(adata, transform_batch="batch_0", return_numpy=True),
                               rtol=1e-4, atol=1e-7)


class _Payload:
    """Unpickling this runs ``os.system('touch <marker>')``: what a booby-trapped model.pt does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_malicious_checkpoint_is_refused_without_running_it(tmp_path, container):
    marker = tmp_path / "pwned"
    scvi_dir = tmp_path / "evil"
    scvi_dir.mkdir()
    payload = {"model_state_dict": {"px_r": torch.zeros(3)}, "var_names": np.array(["g"], dtype=object),
               "attr_dict": {"registry_": _Payload(marker), "init_params_": {}}}
    if container == "torch_zip":
        torch.save(payload, scvi_dir / "model.pt")
    else:
        (scvi_dir / "model.pt").write_bytes(pickle.dumps(payload, protocol=2))  # torch reads protocol 2 plain pickles

    with pytest.raises(ScviIOError, match="refused to load.*allowlist"):
        read_scvi_checkpoint(scvi_dir / "model.pt")
    with pytest.raises(ScviIOError, match="refused"):
        import_from_scvi(scvi_dir, tmp_path / "out")
    with pytest.raises(InferError, match="refused"):
        infer(_export_cfg(tmp_path / "out2", model_dir="-", store="-",
                          export=ExportOptions(direction="from_scvi", source=str(scvi_dir))))
    with pytest.raises(ScviIOError, match="refused"):
        api.load(scvi_dir)
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()

    # the file really is armed: full unpickling (what scvi-tools' own load does) fires it
    if container == "plain_pickle":
        pickle.loads((scvi_dir / "model.pt").read_bytes())
    else:
        torch.load(scvi_dir / "model.pt", weights_only=False)
    assert marker.exists()


def test_export_job_rejects_bad_requests(trained, tmp_path):
    store, run = trained
    with pytest.raises(ConfigError, match="export.direction"):
        load_infer_config({"job": "export", "model_dir": str(run), "store": str(store), "output": str(tmp_path / "a"),
                           "export": {"direction": "sideways"}})
    with pytest.raises(InferError, match="needs export.source"):
        infer(_export_cfg(tmp_path / "b", model_dir="-", store="-", export=ExportOptions(direction="from_scvi")))
    with pytest.raises(InferError, match="does not exist"):
        infer(_export_cfg(tmp_path / "c", model_dir="-", store="-",
                          export=ExportOptions(direction="from_scvi", source=str(tmp_path / "nothing"))))
    not_a_model = tmp_path / "junk"
    not_a_model.mkdir()
    (not_a_model / "model.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(InferError, match="not a readable torch checkpoint"):
        infer(_export_cfg(tmp_path / "d", model_dir="-", store="-",
                          export=ExportOptions(direction="from_scvi", source=str(not_a_model))))
    other = tmp_path / "other_store"
    from tests.train_utils import tiny_store

    tiny_store(other, n_cells=50)  # no covariates, other features: not the model's store
    with pytest.raises(InferError, match="covariates|genes|regions"):
        infer(_export_cfg(tmp_path / "e", model_dir=str(run), store=str(other)))
    assert not any((tmp_path / x).exists() for x in "abcde")


@pytest.mark.slow  # three Hydra subprocesses, one importing scvi-tools: ~25 s unloaded, more on a busy box
def test_mva_infer_cli_export_round_trip(trained, tmp_path):
    """The Hydra entry point: to_scvi then from_scvi gives back our weights; a bad call is one error line."""
    import subprocess

    from safetensors.torch import load_file

    from tests.train_utils import PY, ROOT, env

    store, run = trained

    def cli(*args):
        return subprocess.run([PY, "-m", "trainer.infer", "job=export", *args], check=False, cwd=ROOT,
                              env=env(), capture_output=True, text=True, timeout=300)

    res = cli(f"model_dir={run}", f"store={store}", f"output={tmp_path / 'scvi'}")
    assert res.returncode == 0, res.stderr[-3000:]
    res = cli("model_dir=-", "store=-", "export.direction=from_scvi", f"export.source={tmp_path / 'scvi'}",
              f"output={tmp_path / 'back'}")
    assert res.returncode == 0, res.stderr[-3000:]
    ours, back = load_file(str(run / "model" / WEIGHTS)), load_file(str(tmp_path / "back" / WEIGHTS))
    assert ours.keys() == back.keys()
    for k in ours:
        assert torch.equal(ours[k], back[k]), k
    # the training cell count survives the round trip (scvi's registry held the 3-cell skeleton's)
    mine, again = (json.loads((d / "model.json").read_text()) for d in (run / "model", tmp_path / "back"))
    n_obs = mine["model_args"]["n_obs"]
    assert n_obs > 3 and again["model_args"]["n_obs"] == n_obs
    # and the rest of model.json scvi's registry has no place for: labels (the UMAP's label panel reads
    # label_key) and how the weights were trained (they came back as None / absent)
    assert mine["label_key"] == "cell_type" and mine["label_categories"] and mine["config"]
    for key in ("label_key", "label_categories", "config", "weights", "epochs", "steps", "validation", "best"):
        assert again[key] == mine[key], key
    res = cli("model_dir=-", "store=-", "export.direction=from_scvi", f"output={tmp_path / 'x'}")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("mva-infer: error: direction=from_scvi")


def test_direct_calls_with_overwrite_replace_only_their_own_output(trained, scvi_trained, tmp_path):
    """export_to_scvi / import_from_scvi(overwrite=True) called from Python replace a previous output of
    theirs, never a directory holding anything else (a mistyped path naming a store was deleted)."""
    from trainer.scvi_io import export_to_scvi

    store, run = trained
    scvi_dir, _ = scvi_trained
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ScviIOError, match="is not an export from_scvi output"):
        import_from_scvi(scvi_dir, store, overwrite=True)
    with pytest.raises(ScviIOError, match="is not an export to_scvi output"):
        export_to_scvi(run, run, overwrite=True)
    assert (store / "zarr.json").exists() and sorted(p.name for p in run.iterdir()) == before  # untouched
    out = import_from_scvi(scvi_dir, tmp_path / "imported")
    assert import_from_scvi(scvi_dir, out, overwrite=True) == out  # its own output is replaced


@pytest.mark.parametrize(("likelihood", "size_factors"), [("nb", False), ("poisson", False), ("zinb", True)])
def test_scvi_models_of_every_likelihood_and_size_factors_import_and_match(trained, tmp_path, likelihood,
                                                                           size_factors):
    """scvi-tools builds heads a model may not use: the zero-inflation head for every likelihood, px_r for
    poisson, both library encoders with size factors. The import refused every nb / poisson MULTIVI and every
    one trained with size_factor_key as 'weights with no counterpart' (a size-factor model of ours too)."""
    import scvi

    from trainer.scvi_io import SIZE_FACTOR_COLUMNS

    store, _ = trained
    mdata = store_to_mudata(store)
    scvi.settings.seed = 0
    scvi.model.MULTIVI.setup_mudata(mdata, batch_key="batch", modalities={"rna_layer": "rna", "atac_layer": "atac"},
                                    size_factor_key=list(SIZE_FACTOR_COLUMNS) if size_factors else None)
    ref = scvi.model.MULTIVI(mdata, n_hidden=16, n_latent=4, gene_likelihood=likelihood)
    ref.train(max_epochs=1, accelerator="cpu", batch_size=128, enable_progress_bar=False)
    ref.save(str(tmp_path / "multivi"))
    model = api.load(tmp_path / "multivi")
    assert model.module.gene_likelihood == likelihood and model.module.use_size_factor == size_factors
    np.testing.assert_allclose(model.latent(mdata), ref.get_latent_representation(mdata), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.expression(mdata, transform_batch="batch_1"),
                               ref.get_normalized_expression(mdata, transform_batch="batch_1", return_numpy=True),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(model.accessibility(mdata, normalize_cells=True),
                               ref.get_normalized_accessibility(mdata, normalize_cells=True, return_numpy=True),
                               rtol=1e-4, atol=1e-7)


def test_store_to_mudata_cells_as_a_boolean_mask_or_bad_positions(trained):
    """cells= a boolean mask (obs['batch'] == 'batch_0') was cast to the positions 0/1: 300 copies of the
    first two cells, labelled with their batch; float positions were truncated, -1 wrapped to the last cell."""
    from data.cell_table import as_store

    store, _ = trained
    obs = as_store(store).read_obs()
    sel = (obs["batch"] == "batch_0").to_numpy()
    m = store_to_mudata(store, sel)
    assert list(m.obs_names) == list(obs.index[sel]) and set(m.obs["batch"]) == {"batch_0"}
    assert list(store_to_mudata(store, pd.Series(sel)).obs_names) == list(obs.index[sel])
    assert list(store_to_mudata(store, [5, 3]).obs_names) == list(obs.index[[5, 3]])  # positions, in their order
    for bad, why in ((np.array([1.5, 2.0]), "integer positions or a boolean mask"),
                     (np.array([0, N_CELLS]), f"out of range for a store of {N_CELLS} cells"),
                     (np.array([-1]), f"out of range for a store of {N_CELLS} cells"),
                     (np.array([5, 3, 5]), "more than once"), (sel[:-1], "boolean mask of 299 values")):
        with pytest.raises(ScviIOError, match=why):
            store_to_mudata(store, bad)
    # atac_library_max follows model.json's rule: 0 gave every cell factor 1, -5 gave 1e-6, NaN NaN
    for bad_max in (0, -5.0, float("nan"), float("inf"), "12"):
        with pytest.raises(ScviIOError, match="atac_library_max must be a finite number >= 1"):
            store_to_mudata(store, [0, 1], atac_library_max=bad_max)
    assert store_to_mudata(store, [0, 1], atac_library_max=np.float32(40.0)).obs["_mva_size_factor_atac"].max() <= 1


def test_an_imported_model_reads_size_factors_from_its_own_obs_columns(trained, tmp_path):
    """A MULTIVI trained with size_factor_key=[own columns] decodes with those factors; the API ignored them
    and computed its own (ATAC total / largest total), so accessibility(normalize_cells=True) differed from
    the reference on the same MuData."""
    import scvi

    store, _ = trained
    mdata = store_to_mudata(store)
    atac = np.asarray(mdata["atac"].X.sum(axis=1)).ravel()
    mdata.obs["sf_rna"] = np.maximum(np.asarray(mdata["rna"].X.sum(axis=1)).ravel(), 1.0).astype(np.float32)
    mdata.obs["sf_atac"] = np.clip(atac / np.median(atac[atac > 0]), 1e-6, 1.0).astype(np.float32)  # not ours
    scvi.settings.seed = 0
    scvi.model.MULTIVI.setup_mudata(mdata, batch_key="batch", modalities={"rna_layer": "rna", "atac_layer": "atac"},
                                    size_factor_key=["sf_rna", "sf_atac"])
    ref = scvi.model.MULTIVI(mdata, n_hidden=16, n_latent=4)
    ref.train(max_epochs=1, accelerator="cpu", batch_size=128, enable_progress_bar=False)
    ref.save(str(tmp_path / "multivi"))
    model = api.load(tmp_path / "multivi")
    assert model.info["size_factor_keys"] == ["sf_rna", "sf_atac"]
    np.testing.assert_allclose(model.accessibility(mdata, normalize_cells=True),
                               ref.get_normalized_accessibility(mdata, normalize_cells=True, return_numpy=True),
                               rtol=1e-4, atol=1e-7)
    # without those columns our formula (RNA total, ATAC over the largest) silently stood in for them: refused,
    # as scvi-tools refuses; a store (the jobs) cannot carry them: said, and which outputs it touches
    no_sf = mdata.copy()
    no_sf.obs = no_sf.obs.drop(columns=["sf_atac"])
    with pytest.raises(api.APIError, match=r"size factors from obs columns \['sf_rna', 'sf_atac'\].*\['sf_atac'\] is not"):
        model.accessibility(no_sf, normalize_cells=True)
    from data.synthetic import write_synthetic_store

    plain = write_synthetic_store(tmp_path / "plain", n_cells=N_CELLS, n_genes=100, n_regions=300, progress=False)
    with pytest.warns(UserWarning, match=r"size_factor_key.*store does not carry.*not the latents"):
        assert model.latent(plain).shape == (N_CELLS, 4)


@pytest.mark.parametrize(("likelihood", "dispersion"), [("poisson", "gene-cell"), ("zinb", "gene-cell"),
                                                        ("poisson", "gene-batch")])
def test_unusual_likelihood_and_dispersion_round_trip_through_scvi(trained, tmp_path, likelihood, dispersion):
    """ours -> scvi-tools model.pt -> ours gives back every weight. A poisson model with dispersion=gene-cell
    (valid here, trained and exported like any other) came back as 'weights with no counterpart': the import
    expected no per-cell dispersion head only for dispersions other than gene-cell, but poisson has none."""
    from data.store import open_store
    from trainer.export import build_module, export_model, load_model, weights_of
    from trainer.scvi_io import export_to_scvi

    store, _ = trained
    cfg = tiny_config(store, tmp_path / "run", **{"model.gene_likelihood": likelihood, "model.dispersion": dispersion})
    meta = open_store(store).meta
    torch.manual_seed(0)
    module = build_module(meta, cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ours = export_model(weights_of(module), meta, cfg, tmp_path / "ours")
    back = import_from_scvi(export_to_scvi(ours, tmp_path / "scvi"), tmp_path / "back")
    loaded, info = load_model(back)
    assert info["model_args"]["gene_likelihood"] == likelihood and info["model_args"]["dispersion"] == dispersion
    before, after = weights_of(module), weights_of(loaded)
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
