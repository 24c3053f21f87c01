"""Mapping new cells onto a model trained here (scArches), with scvi-tools' ``MULTIVI.load_query_data`` on
the query and our store, jobs and import at both ends (README "Mapping query cells").

    .venv/bin/python -m pytest tests/test_scvi_query.py -q

A model trained by our trainer -> exported for scvi-tools -> a query with new batches and its genes and
peaks in another order (some missing) -> ``prepare_query_mudata`` + ``load_query_data`` + 2 epochs in
scvi-tools -> imported back. The query store built with ``features_from`` gives scvi-tools' query latents,
and the reference cells keep the reference model's latents exactly (scArches trains the new batch columns
only).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from data.build import build_store
from data.config import BuildConfig, InputConfig
from data.store import open_store
from tests.train_utils import tiny_config
from trainer.infer import infer
from trainer.infer_config import InferConfig


def _embed(store, model_dir, out) -> pd.DataFrame:
    infer(InferConfig(model_dir=str(model_dir), store=str(store), output=str(out), batch_size=64, progress=False,
                      modalities=["joint"]))
    a = ad.read_zarr(str(out))
    return pd.DataFrame(np.asarray(a.obsm["X_multivi"]), index=a.obs_names)


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    import mudata
    import scvi

    from data.synthetic import write_synthetic_store
    from trainer.scvi_import import import_from_scvi
    from trainer.scvi_io import export_to_scvi
    from trainer.train import train

    root = tmp_path_factory.mktemp("query")
    ref_store = write_synthetic_store(root / "ref", n_cells=240, n_genes=60, n_regions=150, progress=False)
    run = train(tiny_config(ref_store, root / "run")).run_dir
    export_to_scvi(run, root / "scvi_ref", store=ref_store)

    # the query as a user has it: other cells, new batch names, genes and peaks shuffled, 3 genes missing
    q = write_synthetic_store(root / "qsyn", n_cells=120, n_genes=60, n_regions=150, seed=7, progress=False)
    md = mudata.read_zarr(open_store(q).shard_path(0))
    rng = np.random.default_rng(0)
    md.mod["rna"] = md.mod["rna"][:, rng.permutation(60)[:57]].copy()
    md.mod["atac"] = md.mod["atac"][:, rng.permutation(150)].copy()
    md.obs["batch"] = ("query_" + md.obs["batch"].astype(str)).astype("category")
    for m in md.mod.values():
        m.obs["batch"] = md.obs["batch"].to_numpy()
    md.update()
    md.write(root / "query.h5mu")

    scvi.settings.seed = 0
    qmd = mudata.read_h5mu(root / "query.h5mu")
    scvi.model.MULTIVI.prepare_query_mudata(qmd, str(root / "scvi_ref"))
    qmodel = scvi.model.MULTIVI.load_query_data(qmd, str(root / "scvi_ref"), accelerator="cpu")
    # weight_decay=0: MULTIVI.train's own default (1e-3, which overrides plan_kwargs) decays the "frozen"
    # weights too (scArches freezes them by zeroing their gradients, AdamW still shrinks them)
    qmodel.train(max_epochs=2, accelerator="cpu", batch_size=64, enable_progress_bar=False, weight_decay=0.0)
    qmodel.save(str(root / "scvi_query"))
    imported = import_from_scvi(root / "scvi_query", root / "ours_query")
    qstore = build_store(BuildConfig(out=str(root / "query.zarr"), progress=False, features_from=str(imported),
                                     inputs=[InputConfig(kind="h5mu", path=str(root / "query.h5mu"))]))
    z_scvi = pd.DataFrame(qmodel.get_latent_representation(qmd), index=qmd.obs_names)
    return {"ref_store": ref_store, "run": run, "imported": imported, "qstore": qstore, "z_scvi": z_scvi}


def test_the_query_store_embeds_as_scvi_tools_maps_it(mapped, tmp_path):
    import json

    info = json.loads((mapped["imported"] / "model.json").read_text())
    assert info["batch_categories"] == ["batch_0", "batch_1", "query_batch_0", "query_batch_1"]
    z = _embed(mapped["qstore"], mapped["imported"], tmp_path / "q.zarr")
    want = mapped["z_scvi"]
    assert len(z) == len(want) == 120
    np.testing.assert_allclose(z.loc[want.index].to_numpy(), want.to_numpy(), rtol=1e-4, atol=1e-5)


def test_reference_cells_keep_their_latents_under_the_query_model(mapped, tmp_path):
    before = _embed(mapped["ref_store"], mapped["run"], tmp_path / "before.zarr")
    after = _embed(mapped["ref_store"], mapped["imported"], tmp_path / "after.zarr")
    np.testing.assert_array_equal(after.loc[before.index].to_numpy(), before.to_numpy())
