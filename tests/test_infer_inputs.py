"""Which stores and models an mva-infer job accepts: a model file or store that does not fit is refused in
one line before anything is written (another store for per-cell weights, a malformed model.json, a store
rebuilt under an unfinished output, ranks reading different copies), and a store of some of the model's
batches gets the model's codes.

    .venv/bin/python -m pytest tests/test_infer_inputs.py -q
"""

from __future__ import annotations

import subprocess

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data import keys
from data.store import open_store
from data.synthetic import write_synthetic_store
from tests.infer_utils import N_CELLS, read_obsm, trained_model
from tests.infer_utils import infer_cfg as _cfg
from tests.train_utils import PY, ROOT, env
from trainer.infer import infer
from trainer.jobs.common import InferError
from trainer.jobs.embed import FAIL_AFTER_ENV


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


def test_a_per_cell_weights_model_refuses_another_store(trained, tmp_path):
    """modality_weights=cell learns one weight row per training cell: another store's cells would read
    past the table (an IndexError traceback) or other cells' weights (silently wrong latents)."""
    from tests.train_utils import tiny_config
    from trainer.export import build_module, export_model, weights_of

    store, _ = trained
    meta = open_store(store).meta
    cfg = tiny_config(store, tmp_path / "run", **{"model.modality_weights": "cell"})
    model_dir = export_model(weights_of(build_module(meta, cfg)), meta, cfg, tmp_path / "model")
    bigger = write_synthetic_store(tmp_path / "bigger", n_cells=N_CELLS + 50, n_genes=100, n_regions=300,
                                   progress=False)
    with pytest.raises(InferError, match=r"modality_weights=cell.*700 training cells.*750 cells"):
        infer(_cfg(bigger, model_dir, tmp_path / "a.zarr"))
    infer(_cfg(store, model_dir, tmp_path / "b.zarr"))  # its own store still works


@pytest.mark.parametrize("tamper", ["bad_option_value", "unknown_option", "no_gene_names", "bad_training_store",
                                    "infinite_training_store"])
def test_a_malformed_model_json_is_one_model_file_error(trained, tmp_path, tamper):
    """docs/reliability.md: a malformed model.json raises ModelFileError naming it (these were a ValueError,
    a TypeError and a KeyError traceback)."""
    import json
    import shutil

    from trainer.export import INFO, ModelFileError

    store, run = trained
    model = tmp_path / "model"
    shutil.copytree(run / "model", model)
    info = json.loads((model / INFO).read_text())
    if tamper == "bad_option_value":
        info["model_args"]["gene_likelihood"] = "bogus"
    elif tamper == "unknown_option":
        info["model_args"]["bogus"] = 1
    elif tamper == "bad_training_store":
        info["training_store"] = {"cells_fingerprint": "ab", "atac_library_max": "many"}
    elif tamper == "infinite_training_store":  # JSON's Infinity: every ATAC size factor 0 (was accepted)
        info["training_store"] = {"cells_fingerprint": "ab", "atac_library_max": float("inf")}
    else:
        del info["gene_names"]
    (model / INFO).write_text(json.dumps(info))
    with pytest.raises(ModelFileError, match="model.json") as exc:
        infer(_cfg(store, model, tmp_path / "a.zarr"))
    assert "\n" not in str(exc.value)


def test_a_store_rebuilt_in_place_is_not_resumed_on(trained, tmp_path, monkeypatch):
    """An unfinished output's chunks were computed on one build of the store: a store rebuilt at the same
    path with as many cells (other counts) must not be resumed on, half old cells and half new."""
    import shutil

    store, run = trained
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    out = tmp_path / "emb.zarr"
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(_cfg(copy, run, out))
    monkeypatch.delenv(FAIL_AFTER_ENV)
    shutil.rmtree(copy)
    write_synthetic_store(copy, n_cells=N_CELLS, n_genes=100, n_regions=300, progress=False, shard_size=400, seed=7)
    with pytest.raises(InferError, match="different settings"):
        infer(_cfg(copy, run, out))
    infer(_cfg(copy, run, out, overwrite=True))
    fresh = tmp_path / "fresh.zarr"
    infer(_cfg(copy, run, fresh))
    for k, v in read_obsm(fresh).items():
        np.testing.assert_array_equal(read_obsm(out)[k], v, err_msg=k)


def test_a_store_of_some_of_the_models_batches_gets_the_models_codes(trained, tmp_path):
    """A store built from part of the data (here: batch_1's cells only) numbers its batches from 0; the jobs
    map its codes to the model's by label, so each cell gets the embedding it has in the full store."""
    from trainer.scvi_io import store_to_mudata

    store, run = trained
    mdata = store_to_mudata(store)
    keep = (mdata.obs["batch"].astype(str) == "batch_1").to_numpy()
    obs = mdata.obs.loc[keep, ["batch", "mask_rna", "mask_atac"]].copy()
    obs["batch"] = obs["batch"].astype(str)
    x = sp.hstack([mdata["rna"].X[keep], mdata["atac"].X[keep]], format="csr")
    var = pd.DataFrame({"modality": ["Gene Expression"] * mdata["rna"].n_vars + ["Peaks"] * mdata["atac"].n_vars},
                       index=list(mdata["rna"].var_names) + list(mdata["atac"].var_names))
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(tmp_path / "part.h5ad")
    from data.build import build_store
    from data.config import BuildConfig, InputConfig

    part = build_store(BuildConfig(out=str(tmp_path / "part.zarr"), progress=False,
                                   inputs=[InputConfig(kind="scvi", path=str(tmp_path / "part.h5ad"))]))
    assert open_store(part).meta.batch_categories == ["batch_1"]  # code 0 here, code 1 in the model
    infer(_cfg(store, run, tmp_path / "full.zarr"))
    infer(_cfg(part, run, tmp_path / "part_emb.zarr"))
    full, got = ad.read_zarr(str(tmp_path / "full.zarr")), ad.read_zarr(str(tmp_path / "part_emb.zarr"))
    for key in ("X_multivi", "X_multivi_expression", "X_multivi_accessibility"):
        np.testing.assert_allclose(got.obsm[key], full[got.obs_names].obsm[key], rtol=1e-5, atol=1e-6, err_msg=key)
    from trainer import api  # the notebook API's store path maps the same way
    np.testing.assert_allclose(api.load(run).latent(str(part)), got.obsm["X_multivi"], rtol=1e-5, atol=1e-6)


def test_recode_maps_batch_and_covariate_codes(tmp_path):
    from data.stream import StoreStream

    st = write_synthetic_store(tmp_path / "cov", n_cells=40, n_genes=20, n_regions=30, progress=False,
                               with_covariates=True)
    stream = StoreStream(st, batch_size=40, split="all", shuffle=False, prefetch=0)
    cells = np.arange(40)
    before = stream.make_batch(cells)
    n_cov = len(open_store(st).meta.cat_cov_categories["site"])
    stream.recode(np.array([300, 200]), [np.arange(n_cov) + 1000])  # wider than the stored code width
    after = stream.make_batch(cells)
    np.testing.assert_array_equal(after[keys.BATCH].numpy(), np.array([300, 200])[before[keys.BATCH].numpy()])
    np.testing.assert_array_equal(after[keys.CAT_COVS].numpy(), before[keys.CAT_COVS].numpy() + 1000)


@pytest.mark.slow  # two 2-rank torchrun jobs
@pytest.mark.parametrize("what", ["store", "model_dir"])
def test_ranks_reading_different_copies_of_the_store_or_model_are_refused(trained, tmp_path, what):
    """Each rank writes its part of one output from its own store and model paths (node-local copies on a
    cluster): another build of the store, or another model, on rank 1 mixed two of them in one output.
    Every rank stops naming it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.train_utils import tiny_store

    store, run = trained
    paths = {"store": [str(store)], "model_dir": [str(run / "model")]}
    if what == "store":
        other = tiny_store(tmp_path / "other", n_cells=N_CELLS, shard_size=400, seed=1)  # same ids, other counts
    else:
        other = tmp_path / "other_model"
        shutil.copytree(run / "model", other)
        w = load_file(other / "model.safetensors")
        first = min(k for k in w if w[k].is_floating_point())
        w[first] = w[first] + 1e-3  # the same model.json, other weights (another training of it)
        save_file(w, other / "model.safetensors")
    paths[what].append(str(other))
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.infer",
           f"output={tmp_path / 'emb.zarr'}", "progress=false",
           *[f"{k}='${{oc.env:MVA_TEST_{k.upper()}_${{oc.env:LOCAL_RANK}}}}'" for k in paths]]
    per_rank = {f"MVA_TEST_{k.upper()}_{r}": v[min(r, len(v) - 1)] for k, v in paths.items() for r in (0, 1)}
    r = subprocess.run(cmd, cwd=ROOT, env={**env(), **per_rank}, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode != 0 and "differs between ranks: rank(s) [1]" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "emb.zarr").exists()


def test_a_training_checkpoint_given_as_a_model_names_the_run_directory(trained, tmp_path, monkeypatch):
    """A checkpoint directory (checkpoints/step_N) holds a model.pt too: mva-infer, features_from and the API
    took it for a scvi-tools model and suggested an import that then failed ('not a scvi-tools model file'),
    and query.reference was told to set model_dir=. Each now says it is a checkpoint and which value to give."""
    from data.build import build_store
    from data.config import BuildConfig, InputConfig
    from data.validate import ValidationError
    from tests.train_utils import tiny_config
    from trainer import api
    from trainer.config import ConfigError
    from trainer.train import train

    store, run = trained
    ckpt = max((run / "checkpoints").iterdir())
    assert (ckpt / "model.pt").is_file() and (ckpt / "trainer.pt").is_file()
    with pytest.raises(InferError, match=rf"{ckpt} is a training checkpoint .*: use model_dir={run}$"):
        infer(_cfg(store, ckpt, tmp_path / "e.zarr"))
    with pytest.raises(InferError, match=rf"training checkpoint .*: use path={run}$"):
        api.load(ckpt, device="cpu")
    # a relative path from inside checkpoints/ (its parent is "."): the run directory all the same
    monkeypatch.chdir(ckpt.parent)
    with pytest.raises(InferError, match=rf"training checkpoint .*: use model_dir={run.resolve()}$"):
        infer(_cfg(store, ckpt.name, tmp_path / "e.zarr"))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=rf"query.reference: .*training checkpoint .*: use query.reference={run}$"):
        train(tiny_config(store, tmp_path / "q", **{"query.reference": str(ckpt)}))
    with pytest.raises(ValidationError, match=rf"features_from: .*training checkpoint .*: use features_from={run}$"):
        build_store(BuildConfig(out=str(tmp_path / "s"), progress=False, features_from=str(ckpt),
                                inputs=[InputConfig(kind="h5ad_pair", rna=str(tmp_path / "missing.h5ad"))]))
