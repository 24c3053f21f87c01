"""Untrusted files: a checkpoint or model carrying a pickled object that would run code is refused and
the code provably does not run; configs are data; the W&B key never reaches a file.

    .venv/bin/python -m pytest tests/test_reliability_untrusted.py -q
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.train_utils import PY, ROOT, as_cli, env, tiny_config, tiny_overrides, tiny_store
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config
from trainer.export import ModelFileError, load_model
from trainer.train import train


class Payload:
    """Unpickling this calls os.system(touch <marker>): what a malicious downloaded checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("untrusted")
    store = tiny_store(base / "store", n_cells=400)
    train(tiny_config(store, base / "run", **{"run.epochs": 1}))
    return store, base / "run"


def _poison(run: Path, dst: Path, name: str, marker: Path) -> Path:
    """A copy of the run whose newest checkpoint file ``name`` also carries the payload."""
    shutil.copytree(run, dst)
    step = ckpt.complete_checkpoints(dst)[-1]
    state = torch.load(step / name, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, step / name)
    return step


def test_the_payload_is_real(trained, tmp_path):
    """Guard against a test that cannot fail: an unsafe load of the poisoned file DOES run the code."""
    marker = tmp_path / "pwned"
    step = _poison(trained[1], tmp_path / "run", "trainer.pt", marker)
    torch.load(step / "trainer.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["trainer.pt", "rank_0.pt", "model.pt"])
def test_poisoned_checkpoint_is_refused_on_resume_and_nothing_runs(trained, tmp_path, name):
    store, run = trained
    marker = tmp_path / "pwned"
    step = _poison(run, tmp_path / "run", name, marker)
    with pytest.raises(ckpt.CheckpointError, match=rf"{name} contains pickled Python objects \(posix.system\)"):
        ckpt.load_states(step, 0, 1)
    assert not marker.exists()
    if name != "model.pt":
        return
    # the real CLI resuming the poisoned run: one line, exit 2, code not run, nothing overwritten
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    r = subprocess.run([PY, "-m", "trainer.train", *as_cli(tiny_overrides(store, tmp_path / "run",
                                                                          **{"run.epochs": 2}))],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "pickled Python objects" in err[0] and "model.pt" in err[0], r.stderr
    assert not marker.exists()
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after


def test_poisoned_model_file_is_refused_by_the_model_loader(trained, tmp_path):
    _, run = trained
    marker = tmp_path / "pwned"
    model = tmp_path / "model"
    shutil.copytree(run / "model", model)
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, model / "model.safetensors")  # a pickle in disguise
    with pytest.raises(ModelFileError, match="model.safetensors is not a valid safetensors file"):
        load_model(model)
    assert not marker.exists()
    r = subprocess.run([PY, "-m", "trainer.infer", f"model_dir={model}", f"store={trained[0]}",
                        f"output={tmp_path / 'emb.zarr'}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode != 0 and "model.safetensors" in r.stderr
    assert not marker.exists() and not (tmp_path / "emb.zarr").exists()


def test_configs_are_data_never_code(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    cfg = load_config({"data": {"store": code}, "logger": {"project": code}, "run": {"output_dir": code}})
    assert cfg.data.store == code and cfg.logger.project == code  # kept as plain strings
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config({"data": {"store": "/x"}, "optim": {"lr": code}})
    assert not marker.exists()
    # and no source file evaluates text or unpickles: every load of ours is weights-only / safetensors / JSON
    bad = re.compile(r"(?<![\w.])(eval|exec)\(|pickle\.loads?\(|yaml\.load\(|weights_only\s*=\s*False|"
                     r"yaml\.unsafe_load|marshal\.loads")
    hits = [f"{p}:{i}" for d in ("data", "trainer", "scripts") for p in (ROOT / d).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line.split("#")[0])]
    assert hits == []


@pytest.mark.slow
def test_wandb_key_is_read_from_the_environment_and_never_written(trained, tmp_path):
    store, _ = trained
    secret = "secret-xyz-4f1d9c"
    dirs = {k: tmp_path / k.lower() for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}
    e = {**env(), "WANDB_API_KEY": secret, "WANDB_MODE": "offline", "HOME": str(tmp_path / "home"),
         **{k: str(v) for k, v in dirs.items()}}
    run = tmp_path / "run"
    r = subprocess.run([PY, "-m", "trainer.train", *as_cli(tiny_overrides(store, run, **{
        "run.epochs": 1, "logger.wandb_mode": "offline"}))], cwd=ROOT, env=e, capture_output=True,
        text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(run.glob("wandb/offline-run-*/run-*.wandb")), "W&B did not run: the test would prove nothing"
    files = [p for d in (run, tmp_path / "home", *dirs.values()) if d.exists() for p in d.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaks == [] and secret not in r.stdout + r.stderr
