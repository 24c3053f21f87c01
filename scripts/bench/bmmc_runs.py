"""What the real-cell training comparisons (``query_map.py``, ``library_prior.py``) share: one thread and W&B off
for every process they start, the BMMC starter's folder, and a training config with the bmmc preset's settings
(conf/experiment/bmmc.yaml: lr 1e-3, 64 cells per batch, KL warm-up over 100 of 200 epochs; no early stopping
and a fresh run directory, so every variant trains the same steps).

Imported first by those scripts (``scripts/bench`` is ``sys.path[0]`` when one of them runs): the thread
variables must be set before torch is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "neurips2021_bmmc_multiome_starter"
EPOCHS, LR, BATCH, WARMUP = 200, 1e-3, 64, 100


def bmmc_config(store, out, epochs: int, **extra):
    """A TrainConfig for ``store`` -> ``out`` with the preset's settings; ``extra``: dotted keys on top."""
    from omegaconf import OmegaConf

    from trainer.config import load_config

    cfg = OmegaConf.create()
    for dotted, value in {"data.store": str(store), "data.batch_size": BATCH, "optim.lr": LR,
                          "optim.n_epochs_kl_warmup": min(WARMUP, epochs), "run.epochs": epochs,
                          "run.early_stopping": False, "run.resume": "none", "run.output_dir": str(out),
                          "logger.plot": False, **extra}.items():
        OmegaConf.update(cfg, dotted, value)  # nested keys from the dotted names, values as given
    return load_config(cfg)
