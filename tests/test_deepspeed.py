"""DeepSpeed ZeRO 1 and 2 on CPU, 2 processes under torchrun: train, checkpoint, resume exactly.

    .venv/bin/python -m pytest tests/test_deepspeed.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import tiny_overrides, tiny_store, train_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store")


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_trains_and_resumes_exactly(store, tmp_path, stage):
    ds = {"dist.backend": "deepspeed", "dist.zero_stage": stage, "run.epochs": 2, "run.keep_checkpoints": 2}
    full = tmp_path / "full"
    res = train_cli(tiny_overrides(store, full, **ds), nproc=2)
    assert "backend deepspeed" in res.stdout
    result = json.loads((full / "result.json").read_text())
    assert result["epochs"] == 2 and result["world_size"] == 2
    first, _last = sorted((full / "checkpoints").glob("step_*"))
    shards = sorted(p.name for p in (first / "deepspeed").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2, shards  # ZeRO partitions the optimizer state over the 2 ranks
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "validation"]
    assert val[1]["reconstruction_loss_validation"] < val[0]["reconstruction_loss_validation"]  # it trains

    # resume from the end of epoch 1 into a fresh directory: epoch 2 must reproduce the full run
    resumed = tmp_path / "resumed"
    res = train_cli(tiny_overrides(store, resumed, **ds, **{"run.resume": str(first)}), nproc=2)
    assert "resumed from" in res.stdout
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=f"{k} differs after resume")
