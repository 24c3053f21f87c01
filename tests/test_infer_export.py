"""mva-infer job=export: overwrite=true replaces only an earlier export output, never another directory.

    .venv/bin/python -m pytest tests/test_infer_export.py -q
"""

from __future__ import annotations

import shutil

import pytest

from tests.infer_utils import trained_model
from trainer.infer import infer
from trainer.infer_config import ExportOptions, InferConfig
from trainer.jobs.common import InferError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


def _export(out, **kw) -> dict:
    return infer(InferConfig(job="export", output=str(out), progress=False, **kw))


def test_overwrite_replaces_an_export_but_never_a_store_or_run_directory(trained, tmp_path):
    store, run = trained
    scvi_dir = tmp_path / "scvi"
    _export(scvi_dir, model_dir=str(run), store=str(store))
    _export(scvi_dir, model_dir=str(run), store=str(store), overwrite=True)  # its own output: replaced
    assert (scvi_dir / "model.pt").is_file()

    victim = tmp_path / "store_copy"
    shutil.copytree(store, victim)
    before = sorted(p.relative_to(victim) for p in victim.rglob("*"))
    with pytest.raises(InferError, match="is not an export to_scvi output"):
        _export(victim, model_dir=str(run), store=str(store), overwrite=True)  # was deleted
    assert sorted(p.relative_to(victim) for p in victim.rglob("*")) == before

    back = ExportOptions(direction="from_scvi", source=str(scvi_dir))
    run_copy = tmp_path / "run_copy"
    shutil.copytree(run, run_copy)
    with pytest.raises(InferError, match="is not an export from_scvi output"):
        _export(run_copy, export=back, overwrite=True)
    assert (run_copy / "checkpoints").is_dir() and (run_copy / "config.yaml").is_file()
    ours = tmp_path / "ours"
    _export(ours, export=back)
    _export(ours, export=back, overwrite=True)
    assert (ours / "model.safetensors").is_file()


def test_a_scvi_model_given_as_model_dir_names_the_import(trained, tmp_path):
    """model_dir=<a scvi-tools MULTIVI dir> (trainer.api.load takes one) said only 'neither an exported model
    nor a run directory'; it now names the from_scvi import that makes it usable."""
    store, run = trained
    scvi_dir = tmp_path / "scvi"
    _export(scvi_dir, model_dir=str(run), store=str(store))
    with pytest.raises(InferError, match=r"scvi-tools model \(model\.pt\).*export\.direction=from_scvi "
                                         rf"export\.source={scvi_dir} "):
        infer(InferConfig(model_dir=str(scvi_dir), store=str(store), output=str(tmp_path / "e.zarr"),
                          progress=False))
