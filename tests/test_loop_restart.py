"""What a run leaves in its directory when it starts afresh there: after an attempt killed before its
first checkpoint (a preempted job: epoch 0 of an atlas takes hours), or with resume=none after the
earlier run's checkpoints were deleted.

    .venv/bin/python -m pytest tests/test_loop_restart.py -q
"""

from __future__ import annotations

import collections
import signal
import subprocess

import pytest

from tests.train_utils import PY, ROOT, as_cli, env, tiny_overrides, tiny_store
from trainer import checkpoint as ckpt
from trainer.metrics import read_metrics


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store", n_cells=400)


def _kill_in_first_checkpoint_write(overrides: dict) -> None:
    """Run mva-train and SIGKILL it inside its first checkpoint write (no complete checkpoint exists)."""
    proc = subprocess.Popen([PY, "-m", "trainer.train", *as_cli(overrides)], cwd=ROOT,
                            env={**env(), "MVA_FAULT_PAUSE_CHECKPOINT": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("[fault] paused in checkpoint write"):
                break
        else:
            pytest.fail("training ended without reaching the paused checkpoint write")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def _cli(overrides: dict) -> subprocess.CompletedProcess:
    res = subprocess.run([PY, "-m", "trainer.train", *as_cli(overrides)], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_a_restart_before_the_first_checkpoint_logs_every_step_once(store, tmp_path):
    """The rerun found no checkpoint and started at step 1, appending to the killed attempt's
    metrics.jsonl: every step of epoch 0 was recorded twice (and loss.png drew the curve twice)."""
    run = tmp_path / "run"
    ov = tiny_overrides(store, run, **{"run.epochs": 1, "logger.log_every": 1})
    _kill_in_first_checkpoint_write(ov)
    killed = read_metrics(run / "metrics.jsonl")
    assert killed and not ckpt.complete_checkpoints(run)  # the attempt logged its epoch, then died
    res = _cli(ov)
    assert "resumed from" not in res.stdout
    rows = [(r["kind"], r["step"]) for r in read_metrics(run / "metrics.jsonl")]
    twice = [k for k, n in collections.Counter(rows).items() if n > 1]
    assert not twice, f"records logged twice: {twice[:4]}"
    assert rows == [(r["kind"], r["step"]) for r in killed]  # the same steps, once each
