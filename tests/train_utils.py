"""Shared helpers of the trainer tests: a tiny real store and a tiny config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from data.synthetic import write_synthetic_store
from trainer.config import TrainConfig, load_config
from trainer.precision import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# DeepSpeed trains bf16 weights on a CPU only where it has native bf16 GEMMs (trainer.precision.deepspeed_bf16)
NEEDS_BF16_CPU = pytest.mark.skipif(not cpu_has_native_bf16(),
                                    reason="DeepSpeed trains bf16 on CPUs with native bf16 only")
PRECISIONS = ["fp32", pytest.param("bf16", marks=NEEDS_BF16_CPU)]


def tiny_store(path: Path, n_cells: int = 1200, **kw) -> Path:
    """A small multiome store (2 batches, paired + RNA-only + ATAC-only cells) written by mva-synth."""
    return write_synthetic_store(path, n_cells=n_cells, n_genes=100, n_regions=300, progress=False, **kw)


def tiny_overrides(store: Path, out: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "data": {"store": str(store), "batch_size": 64, "chunk_size": 16, "prefetch": 0},
        "model": {"n_hidden": 32, "n_latent": 6},
        "optim": {"lr": 1e-3, "n_epochs_kl_warmup": 2},
        "run": {"epochs": 2, "output_dir": str(out), "resume": "auto"},
        "logger": {"log_every": 2, "plot": False},
    }
    for dotted, value in extra.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def tiny_config(store: Path, out: Path, **extra: Any) -> TrainConfig:
    return load_config(tiny_overrides(store, out, **extra))


def as_cli(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested dict -> Hydra ``a.b=value`` arguments."""
    out = []
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += as_cli(v, key + ".")
        else:
            out.append(f"{key}={'null' if v is None else v}")
    return out


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"),
             DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    return e


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), check=False, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def train_cli(overrides: dict[str, Any], *more: str, nproc: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    args = ["-m", "trainer.train", *more, *as_cli(overrides)]  # flags (--multirun) before overrides
    if nproc > 1:
        return torchrun(args, nproc=nproc, timeout=timeout)
    res = subprocess.run([PY, *args], cwd=ROOT, env=env(), check=False, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"mva-train failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def kill_in_checkpoint_write(overrides: dict[str, Any], nth: int = 1) -> None:
    """Run mva-train and SIGKILL it inside its ``nth`` checkpoint write (paused there by the fault hook
    ``MVA_FAULT_PAUSE_CHECKPOINT``: after the weights, before the trainer state)."""
    import pytest

    proc = subprocess.Popen([PY, "-m", "trainer.train", *as_cli(overrides)], cwd=ROOT,
                            env={**env(), "MVA_FAULT_PAUSE_CHECKPOINT": str(nth)}, stdout=subprocess.PIPE,
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


def validations_get_worse(monkeypatch, key: str = "reconstruction_loss_validation", by: float = 1e6) -> None:
    """Every validation of trainer.train in this test reads ``by`` higher than the one before (the real value
    plus k x by), so the first one stays the lowest: keep=best then ships epoch 0's weights while training goes
    on (the run's weights and everything else are untouched; in-process runs only)."""
    from trainer import loop

    real, calls = loop.validate, [0]

    def worse(*args, **kwargs):
        out = dict(real(*args, **kwargs))
        out[key] += calls[0] * by
        calls[0] += 1
        return out

    monkeypatch.setattr(loop, "validate", worse)
