"""Write faults: SIGKILL in the middle of a checkpoint write, and a full disk (a real size-limited tmpfs,
the kernel's own ENOSPC) during a checkpoint and during an inference output write. The previous
checkpoint / output stays loadable, the error is one line, the rerun completes.

    .venv/bin/python -m pytest tests/test_reliability_checkpoint.py -q
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from tests.faults.mounts import fill, tmpfs
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
from trainer.train import train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store", n_cells=400)


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _assert_loadable(step: Path) -> None:
    state, rank_state = ckpt.load_states(step, 0, 1)
    model = ckpt.safe_load(step / "model.pt")
    assert int(state["step"]) == int(step.name.split("_")[1]) and "rng" in rank_state
    assert all(torch.isfinite(v).all() for v in model["model"].values())


def _cli(overrides: dict, extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "trainer.train", *as_cli(overrides)], cwd=ROOT, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=300, check=False, **kw)


@pytest.mark.slow  # ~30 s on the loaded 2-core box
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_the_rerun_resumes(store, tmp_path):
    run = tmp_path / "run"
    ov = tiny_overrides(store, run, **{"run.epochs": 1, "run.checkpoint_every_steps": 2})
    # the 2nd checkpoint write (step 4) stops after the weights, before the trainer state: kill it there
    kill_in_checkpoint_write(ov, 2)
    partial = run / "checkpoints" / ".tmp_step_000000004"
    assert (partial / "model.pt").is_file() and not (partial / "trainer.pt").exists()  # really mid-write
    done = ckpt.complete_checkpoints(run)
    assert [p.name for p in done] == ["step_000000002"]
    _assert_loadable(done[0])
    assert ckpt.find_resume(run, "auto") == done[0]
    r = _cli(ov)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {done[0]} (epoch 0, step 2)" in r.stdout
    assert (run / "model" / "model.safetensors").is_file() and not partial.exists()


@pytest.mark.slow  # ~30 s on the loaded 2-core box
def test_disk_full_during_a_checkpoint_is_one_line_and_loses_nothing(store, tmp_path):
    with tmpfs(tmp_path / "fs", "24m") as fs:
        run = fs / "run"
        train(tiny_config(store, run, **{"run.epochs": 1}))
        (step,) = ckpt.complete_checkpoints(run)
        before_ckpt, before_model = _digest(step), _digest(run / "model")
        size = sum((step / f).stat().st_size for f in before_ckpt)
        filler = fill(fs, leave_bytes=size // 3)  # room for the lock and log lines, not for a checkpoint
        ov = tiny_overrides(store, run, **{"run.epochs": 2})
        r = _cli(ov)
        assert r.returncode == 2, r.stderr[-3000:]
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and "No space left on device" in err[0], r.stderr[-3000:]
        assert f"the newest complete checkpoint {step} is intact" in err[0]
        # nothing already saved is lost: same files, same bytes, still loadable; no partial left behind
        assert ckpt.complete_checkpoints(run) == [step] and _digest(step) == before_ckpt
        assert _digest(run / "model") == before_model
        assert not list((run / "checkpoints").glob(".tmp_*"))
        assert (run / "config.yaml").read_text().strip()
        _assert_loadable(step)
        # space freed: the same command resumes and finishes
        filler.unlink()
        r = _cli(ov)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resumed from {step}" in r.stdout and ckpt.complete_checkpoints(run)[-1].name > step.name


@pytest.mark.slow
def test_disk_full_during_an_inference_output_write_keeps_earlier_outputs(store, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(store, run, **{"run.epochs": 1}))
    with tmpfs(tmp_path / "fs", "24m") as fs:
        def infer(out: Path) -> subprocess.CompletedProcess:
            return subprocess.run([PY, "-m", "trainer.infer", f"model_dir={run}", f"store={store}", f"output={out}",
                                   "job=expression", "batch_size=64"], cwd=ROOT, env=env(), capture_output=True,
                                  text=True, timeout=300, check=False)

        r = infer(fs / "first.zarr")
        assert r.returncode == 0, r.stderr[-3000:]
        first = ad.read_zarr(fs / "first.zarr")
        before = _digest(fs / "first.zarr")
        fill(fs, leave_bytes=64 * 1024)
        r = infer(fs / "second.zarr")
        assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr[-3000:]
        assert not (fs / "second.zarr").exists()  # only the final name means complete
        assert _digest(fs / "first.zarr") == before
        again = ad.read_zarr(fs / "first.zarr")
        np.testing.assert_array_equal(np.asarray(again.X), np.asarray(first.X))
