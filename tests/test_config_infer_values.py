"""mva-infer values that passed the config and then crashed or were silently ignored / wrong are refused at
start-up, naming the key (outputs of the runs before the fix in the comments: 400-cell store, tiny model).

    .venv/bin/python -m pytest tests/test_config_infer_values.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from data.typed_config import ConfigError
from tests.infer_utils import infer_cfg
from tests.train_utils import tiny_config, tiny_store
from trainer.infer import infer
from trainer.infer_config import ExpressionOptions, load_infer_config
from trainer.train import train

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def _load(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return load_infer_config(compose(config_name="infer",
                                         overrides=["model_dir=/m", "store=/s", "output=/o", *overrides]))


@pytest.mark.parametrize("overrides,key", [
    # "ValueError: PosixPath('.') has an empty name" traceback
    (("output=''",), "output"),
    # 'Overflow when unpacking long long' / an uns write error, tracebacks after the model was read
    (("give_mean=false", "seed=99999999999999999999"), "seed"),
    # X was inf for every cell and gene
    (("job=expression", "expression.library_size=inf"), "expression.library_size"),
    # delta=inf: every proba_de 0; pseudocounts=inf: every lfc NaN; both written as a normal table
    (("job=de", "de.groupby=cell_type", "de.delta=inf"), "de.delta"),
    (("job=de", "de.groupby=cell_type", "de.pseudocounts=inf"), "de.pseudocounts"),
    # vanilla ignores them (the table was the vanilla one)
    (("job=de", "de.groupby=cell_type", "de.mode=vanilla", "de.delta=0.5"), "de.delta"),
    (("job=da", "de.groupby=cell_type", "de.mode=vanilla", "de.test_mode=two"), "de.test_mode"),
    (("job=de", "de.groupby=cell_type", "de.mode=vanilla", "de.pseudocounts=auto"), "de.pseudocounts"),
    # []: 'ValueError: No objects to concatenate' traceback; a repeat was compared twice
    (("job=de", "de.groupby=cell_type", "de.group1=[]"), "de.group1"),
    (("job=de", "de.groupby=cell_type", "de.group1=[type_0,type_0]"), "de.group1"),
    # "Cannot convert 'ListConfig' to string": the opposite mistake of de.group1=type_0 got no hint
    (("job=de", "de.groupby=cell_type", "de.group2=[type_1]"), "de.group2 takes one value, not a list: e.g. de.group2=type_1"),
    # options of another job, or top-level ones the job does not read, were silently ignored
    (("job=embed", "expression.genes=[gene_00001]"), "expression.genes"),
    (("job=embed", "de.groupby=cell_type"), "de.groupby"),
    (("job=embed", "export.direction=from_scvi"), "export.direction"),
    (("job=expression", "accessibility.threshold=0.5"), "accessibility.threshold"),
    (("job=de", "de.groupby=cell_type", "embed.umap_png=u.png"), "embed.umap_png"),
    (("job=expression", "modalities=[joint]"), "modalities"),
    (("job=export", "give_mean=false", "n_samples=3"), "give_mean, n_samples"),
    # output=x.parquet with the csv default wrote CSV text into it (and back: Parquet bytes in a .csv)
    (("job=de", "de.groupby=cell_type", "output=x.parquet"), "names a parquet file but de.format=csv"),
    (("job=da", "de.groupby=cell_type", "de.format=parquet", "output=x.csv"), "names a csv file but de.format=parquet"),
    (("job=export", "batch_size=7", "seed=5"), "batch_size, seed do not apply to job=export export.direction=to_scvi"),
    (("job=export", "export.direction=from_scvi", "export.source=/x"),
     "model_dir, store do not apply to job=export export.direction=from_scvi"),
    # a sparse X (threshold) is always compressed: compress was ignored
    (("job=accessibility", "accessibility.threshold=0.5", "accessibility.compress=false"), "accessibility.compress"),
    # a Zarr directory was written under the name, and sc.read_h5ad(x.h5ad) said "Is a directory"
    (("job=embed", "output=x.h5ad"), "output x.h5ad: job=embed writes an AnnData Zarr directory, not a .h5ad file"),
    (("job=expression", "output=x.h5mu"), "give it a .zarr name"),
    (("job=embed", "modalities=[joint,protein]"), "or rna, atac"),
])
def test_bad_or_ignored_values_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _load(*overrides)


@pytest.mark.parametrize("overrides", [
    ("job=expression", "expression.library_size=observed"), ("job=expression", "expression.library_size=1e4"),
    ("job=de", "de.groupby=cell_type", "de.delta=auto", "de.pseudocounts=auto"),
    ("job=de", "de.groupby=cell_type", "de.mode=vanilla"), ("job=da", "de.groupby=cell_type", "de.group1=[a,b]"),
    ("job=embed", "modalities=[joint]", "give_mean=false", "n_samples=2", "seed=17592186044415"),
    ("job=accessibility", "accessibility.threshold=0", "accessibility.compress=true"),
    ("job=accessibility", "accessibility.threshold=0.5", "accessibility.dtype=uint8"),
    ("job=export", "export.direction=from_scvi", "export.source=/x", "model_dir=-", "store=-"),
    ("job=de", "de.groupby=cell_type", "de.format=parquet", "output=x.parquet"), ("job=da", "output=x.tsv"),
])
def test_valid_values_stay_valid(overrides):
    _load(*overrides)


def test_python_callers_may_leave_other_sections_set():
    """Only the command line is checked for other jobs' options: a Python InferConfig for job=de may carry an
    expression section it does not read (tests/test_infer_de.py relies on it)."""
    from trainer.infer_config import InferConfig

    InferConfig(model_dir="m", store="s", output="o", job="de", expression=ExpressionOptions(library_size=1e4))


def test_an_infinite_library_size_no_longer_writes_inf(tmp_path):
    """The real job: before the fix it wrote X = inf everywhere; now refused before anything is read."""
    store = tiny_store(tmp_path / "store", n_cells=200)
    train(tiny_config(store, tmp_path / "run", **{"run.epochs": 1}))
    with pytest.raises(ConfigError, match="expression.library_size"):
        infer(infer_cfg(store, tmp_path / "run", tmp_path / "x.zarr", job="expression",
                        expression=ExpressionOptions(library_size=math.inf)))
    assert not (tmp_path / "x.zarr").exists()
    infer(infer_cfg(store, tmp_path / "run", tmp_path / "ok.zarr", job="expression",
                    expression=ExpressionOptions(library_size=1e4)))
    assert np.isfinite(ad.read_zarr(str(tmp_path / "ok.zarr")).X).all()


def test_the_api_modality_names_are_the_jobs_too():
    """trainer.api takes modality="rna" / "atac"; mva-infer refused modalities=[joint,rna]. The same names now,
    each latent once (the obsm keys stay X_multivi_expression / _accessibility)."""
    assert _load("modalities=[joint,rna,atac,expression]").modalities == ["joint", "expression", "accessibility"]
