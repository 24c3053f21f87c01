"""Our side: scenario -> .h5ad pair -> mva-build store -> the real trainer -> exported model.

The store is built from the TRAINING VIEW only: the RNA file holds the paired and RNA-only cells, the
ATAC file the paired and ATAC-only cells (an ``h5ad_pair`` input with partly overlapping cells, as a
user would give it). Hidden counts are never written anywhere the trainer reads.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from trainer.module import MultiVAE
from trainer.quality.data import PairedData
from trainer.quality.scenario import Scenario, training_view
from trainer.quality.settings import TrainSettings


@dataclass
class OursRun:
    module: MultiVAE
    store: Path
    store_order: np.ndarray  # store row r holds data cell store_order[r]
    skipped_steps: int  # non-finite steps the trainer's guard skipped
    finite: bool  # every logged training loss and the final validation were finite
    train_seconds: float


def write_view(data: PairedData, sc: Scenario, out_dir: Path) -> tuple[Path, Path]:
    """The two .h5ad files of the training view (hidden cells are simply absent from a file)."""
    import anndata as ad

    rna, atac = training_view(sc, data.rna, data.atac)
    obs = pd.DataFrame({"batch": data.batch}, index=pd.Index(data.cell_ids, dtype=str))
    has = sc.mask
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, x, keep, names in (("rna", rna, has[:, 0], data.gene_names), ("atac", atac, has[:, 1], data.region_names)):
        rows = np.flatnonzero(keep)
        a = ad.AnnData(sp.csr_matrix(x[rows], dtype=np.int32), obs=obs.iloc[rows].copy(),
                       var=pd.DataFrame(index=pd.Index(names, dtype=str)))
        p = out_dir / f"view_{name}.h5ad"
        a.write_h5ad(p)
        paths.append(p)
    return paths[0], paths[1]


def build_view_store(data: PairedData, sc: Scenario, work: Path) -> tuple[Path, np.ndarray]:
    """mva-build the training view into a store; returns (store, data index of every store row)."""
    from data.build import build_store
    from data.config import BuildConfig, InputConfig
    from data.store import open_store

    rna_p, atac_p = write_view(data, sc, work / "inputs")
    store = work / "store.zarr"
    build_store(BuildConfig(out=str(store), inputs=[InputConfig(kind="h5ad_pair", rna=str(rna_p), atac=str(atac_p))],
                            batch_key="batch", preshuffle=True, seed=sc.seed, overwrite=True, progress=False))
    ids = open_store(store).read_obs().index.to_numpy(dtype=str)
    pos = pd.Index(data.cell_ids).get_indexer(ids)
    if (pos < 0).any():
        raise RuntimeError(f"store {store} holds cells that are not in the input")
    return store, pos


def ours_config(store: Path, s: TrainSettings, run_dir: Path):
    """The trainer config of our side: the reference's training semantics (docs/quality.md, table of
    differences) expressed in our config."""
    from trainer.config import load_config

    # chunk 4 / 4096-chunk window: the whole (small) store is shuffled each epoch at 4-cell granularity,
    # close to the reference's per-cell shuffle. remainder none: a short last batch, as the reference's
    # drop_last=False (pad would fill it with ~100 repeated cells: same step count, other gradients).
    return load_config({
        "data": {"store": str(store), "batch_size": s.batch_size, "chunk_size": 4, "window_chunks": 4096,
                 "prefetch": 0, "val_fraction": s.val_fraction, "remainder": "none"},
        "model": {"dropout_rate": s.dropout_rate},
        "optim": {"lr": s.lr, "n_epochs_kl_warmup": s.n_epochs_kl_warmup, "adversarial": s.adversarial},
        "run": {"epochs": s.epochs, "seed": s.seed, "output_dir": str(run_dir), "resume": "none",
                "early_stopping": False, "keep_checkpoints": 1},
        "logger": {"log_every": 1, "plot": False}})


@contextmanager
def _ablation(s: TrainSettings, init_state: dict | None):
    """Swap one of our random sources for the reference's, for this training only (harness ablations,
    docs/quality.md): the trainer's module builder then loads ``init_state``; ``ours_noise="global"``
    makes the loop pass no noise, so the module draws it from the global generator as MULTIVI does."""
    from trainer import loop

    saved = loop.build_module, loop.step_noise
    if init_state is not None:
        def build(meta, cfg):
            module = saved[0](meta, cfg)
            module.load_state_dict(init_state)
            return module

        loop.build_module = build
    if s.ours_noise == "global":
        loop.step_noise = lambda *args, **kwargs: None
    try:
        yield
    finally:
        loop.build_module, loop.step_noise = saved


def train_ours(data: PairedData, sc: Scenario, s: TrainSettings, work: Path,
               init_state: dict | None = None) -> OursRun:
    import time

    from trainer.export import load_model
    from trainer.train import train

    store, order = build_view_store(data, sc, work)
    t0 = time.perf_counter()
    shutil.rmtree(work / "run", ignore_errors=True)  # a fresh run (resume=none refuses an old run's checkpoints)
    with _ablation(s, init_state):
        res = train(ours_config(store, s, work / "run"))
    seconds = time.perf_counter() - t0
    module, _ = load_model(res.model_dir)
    return OursRun(module, store, order, res.skipped_steps, _all_finite(Path(res.run_dir), res.last_validation),
                   seconds)


def _all_finite(run_dir: Path, last_val: dict) -> bool:
    """True when every logged training loss and the last validation are finite numbers."""
    vals = [v for k, v in last_val.items() if isinstance(v, float)]
    for f in run_dir.glob("metrics*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            vals += [rec[k] for k in ("loss", "recon_rna", "recon_atac", "kl") if isinstance(rec.get(k), (int, float))]
    return bool(np.all(np.isfinite(vals)))
