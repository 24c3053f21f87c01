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
