"""The exported model directory (model.safetensors + model.json) always holds a matching pair.

    .venv/bin/python -m pytest tests/test_export_model_files.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from data.store import open_store
from tests.train_utils import tiny_config, tiny_store
from trainer import export
from trainer.export import build_module, export_model, load_model, weights_of


def test_an_export_killed_before_model_json_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    """A finished run re-exports its model when it is resumed with more epochs. The export wrote
    model.safetensors in place and then model.json: a kill between the two (or during the JSON) left the new
    weights described by the old model.json (its epochs, steps and validation), and loadable as such."""
    store = tiny_store(tmp_path / "store", n_cells=200)
    cfg = tiny_config(store, tmp_path / "run")
    meta = open_store(store).meta
    module = build_module(meta, cfg)
    out = tmp_path / "run" / "model"
    export_model(weights_of(module), meta, cfg, out, extra={"epochs": 3, "steps": 24})
    before = {k: v.clone() for k, v in weights_of(module).items()}

    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing model.json")

    monkeypatch.setattr(export, "json", type("json", (), {"dumps": staticmethod(killed)}))
    with pytest.raises(KeyboardInterrupt):
        export_model(weights_of(module), meta, cfg, out, extra={"epochs": 6, "steps": 48})
    monkeypatch.undo()

    loaded, info = load_model(out)
    assert info["epochs"] == 3 and info["steps"] == 24
    stale = [k for k, v in weights_of(loaded).items() if not torch.equal(v, before[k])]
    assert not stale, f"model.json says epoch 3, but model.safetensors holds other weights: {stale[:3]}"
    assert json.loads((out / export.INFO).read_text())["epochs"] == 3
    # the resumed run's next export completes the pair and leaves no temporary file behind
    export_model(weights_of(module), meta, cfg, out, extra={"epochs": 6, "steps": 48})
    loaded, info = load_model(out)
    now = weights_of(module)
    assert info["epochs"] == 6 and all(torch.equal(v, now[k]) for k, v in weights_of(loaded).items())
    assert sorted(p.name for p in out.iterdir()) == [export.INFO, export.WEIGHTS]


def test_weights_and_description_of_two_exports_are_refused_and_a_resume_repairs_them(tmp_path):
    """The two files are renamed into place one after the other: a kill between the renames (or copying one
    file by hand from another export) paired the new weights with the old model.json, which loaded and
    described them wrongly (epochs, steps, validation). Each export now writes one id into both files."""
    from trainer.train import train

    store = tiny_store(tmp_path / "store", n_cells=200)
    cfg = tiny_config(store, tmp_path / "run")
    first = train(cfg)
    out = tmp_path / "run" / "model"
    old_info = (out / export.INFO).read_text()
    info = json.loads(old_info)
    assert len(info[export.EXPORT_ID]) == 32

    # another export of the same model (same constructor arguments, other weights): rename only its weights
    other = tmp_path / "other"
    meta = open_store(store).meta
    export_model(weights_of(build_module(meta, cfg)), meta, cfg, other, extra={"epochs": 9})
    (other / export.WEIGHTS).replace(out / export.WEIGHTS)
    with pytest.raises(export.ModelFileError, match="come from different exports.*rerun the training command"):
        load_model(out)

    # resuming the finished run exports its pair again; the same weights give the same id, so model.json is the
    # same file as before (a random id broke a query run's record of its reference at such a re-export)
    again = train(cfg)
    assert again.epochs == first.epochs
    loaded, info = load_model(out)
    assert (out / export.INFO).read_text() == old_info
    assert info[export.EXPORT_ID] == export.weights_digest(weights_of(loaded))

    # weights another tool wrote (no id: e.g. cast to bf16) still load beside our model.json, and so does a model
    # exported before the id existed (neither file holds one)
    from safetensors.torch import save_file
    save_file(weights_of(loaded), str(out / export.WEIGHTS))
    load_model(out)
    del info[export.EXPORT_ID]
    (out / export.INFO).write_text(json.dumps(info))
    load_model(out)
