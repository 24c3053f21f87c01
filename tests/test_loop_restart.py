"""What a run leaves in its directory when it starts afresh there: after an attempt killed before its
first checkpoint (a preempted job: epoch 0 of an atlas takes hours), or with resume=none after the
earlier run's checkpoints were deleted.

    .venv/bin/python -m pytest tests/test_loop_restart.py -q
"""

from __future__ import annotations

import collections
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import (
    PY,
    ROOT,
    as_cli,
    env,
    kill_in_checkpoint_write,
    tiny_config,
    tiny_overrides,
    tiny_store,
)
from trainer import checkpoint as ckpt
from trainer.metrics import read_metrics
from trainer.train import train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store", n_cells=400)


def _cli(overrides: dict) -> subprocess.CompletedProcess:
    res = subprocess.run([PY, "-m", "trainer.train", *as_cli(overrides)], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow  # a killed mva-train process and its rerun
def test_a_restart_before_the_first_checkpoint_logs_every_step_once(store, tmp_path):
    """The rerun found no checkpoint and started at step 1, appending to the killed attempt's
    metrics.jsonl: every step of epoch 0 was recorded twice (and loss.png drew the curve twice)."""
    run = tmp_path / "run"
    ov = tiny_overrides(store, run, **{"run.epochs": 1, "logger.log_every": 1})
    kill_in_checkpoint_write(ov, 1)
    killed = read_metrics(run / "metrics.jsonl")
    assert killed and not ckpt.complete_checkpoints(run)  # the attempt logged its epoch, then died
    res = _cli(ov)
    assert "resumed from" not in res.stdout
    rows = [(r["kind"], r["step"]) for r in read_metrics(run / "metrics.jsonl")]
    twice = [k for k, n in collections.Counter(rows).items() if n > 1]
    assert not twice, f"records logged twice: {twice[:4]}"
    assert rows == [(r["kind"], r["step"]) for r in killed]  # the same steps, once each


def test_keep_best_never_exports_weights_this_run_did_not_train(store, tmp_path):
    """resume=none after the earlier run's checkpoints were deleted (what its refusal suggests): a run that
    ends before a tracked validation (here max_steps inside epoch 0) exported the EARLIER run's best/
    weights under its own name, with best=None in result.json."""
    run = tmp_path / "run"
    opts = {"run.epochs": 1, "run.keep": "best"}
    first = train(tiny_config(store, run, **{**opts, "run.seed": 1}))
    assert first.best is not None and (run / ckpt.BEST_FILE).is_file()
    earlier = load_file(str(run / "model" / "model.safetensors"))
    for old in ckpt.complete_checkpoints(run):
        shutil.rmtree(old)
    res = train(tiny_config(store, run, **{**opts, "run.seed": 2, "run.resume": "none", "run.max_steps": 3}))
    assert res.steps == 3 and res.best is None
    exported = load_file(str(run / "model" / "model.safetensors"))
    trained = ckpt.safe_load(ckpt.complete_checkpoints(run)[-1] / "model.pt")["model"]  # this run's weights
    assert any(not torch.equal(exported[k], earlier[k]) for k in exported), "exported the earlier run's weights"
    for k, v in exported.items():
        assert torch.equal(v, trained[k].to(v.dtype)), k
