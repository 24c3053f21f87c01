"""Shared pieces of the mva-infer tests: one small model trained by the real trainer on a real store
(trained once per pytest session, whichever infer test file asks first), the store's cells as dense
matrices, and the reference (scvi-tools 1.5.1 ``MULTIVI``) holding the same weights on the same cells.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from data import keys
from data.store import open_store
from tests.train_utils import tiny_config, tiny_store
from trainer.export import load_model
from trainer.infer_config import InferConfig
from trainer.train import train

N_CELLS, BATCH = 700, 96  # 8 output chunks, the last one short; 2 shards so chunks cross a shard boundary
_CACHE: dict = {}


def trained_model(tmp_path_factory) -> tuple[Path, Path]:
    """(store, run directory) of a 2-epoch model on a 700-cell, 100-gene, 300-region store (each test
    module wraps this in its own ``trained`` fixture; the model is trained once per session)."""
    if "trained" not in _CACHE:
        root = tmp_path_factory.mktemp("infer")
        store = tiny_store(root / "store", n_cells=N_CELLS, shard_size=400)
        res = train(tiny_config(store, root / "run"))
        _CACHE["trained"] = (store, Path(res.run_dir))
    return _CACHE["trained"]


def infer_cfg(store, run, out, **kw) -> InferConfig:
    return InferConfig(model_dir=str(run), store=str(store), output=str(out), batch_size=BATCH, progress=False, **kw)


def read_obsm(path) -> dict[str, np.ndarray]:
    """Every obsm entry of an AnnData Zarr output as numpy arrays."""
    import anndata as ad

    return {k: np.asarray(v) for k, v in ad.read_zarr(str(path)).obsm.items()}


def store_arrays(store_path) -> tuple:
    """(obs, dense RNA, dense ATAC) of every cell in store order, read straight from the store's CSR rows."""
    st = open_store(store_path)
    obs = st.read_obs()
    mats = {m: sp.vstack([st.read_rows(m, s, 0, st.meta.shard_offsets[s + 1] - st.meta.shard_offsets[s])
                          for s in range(st.meta.n_shards)]).toarray().astype(np.float32) for m in keys.MODALITIES}
    return obs, mats[keys.RNA], mats[keys.ATAC]


def dense_batch(store_path, model_info: dict) -> dict:
    """Every cell in one dense minibatch (no loader), for in-memory comparisons."""
    obs, rna, atac = store_arrays(store_path)
    n = len(obs)
    return {keys.RNA: torch.from_numpy(rna), keys.ATAC: torch.from_numpy(atac),
            keys.MASK: torch.tensor(np.stack([obs["mask_rna"].to_numpy(bool), obs["mask_atac"].to_numpy(bool)], 1)),
            keys.BATCH: torch.tensor(obs[model_info["batch_key"]].cat.codes.to_numpy(np.int64)),
            keys.CAT_COVS: torch.zeros(n, 0, dtype=torch.long), keys.CONT_COVS: torch.zeros(n, 0)}


def reference_model(store_path, model_dir):
    """scvi-tools' MULTIVI on an in-memory MuData of the store's cells, holding our trained weights
    (``trainer.scvi_io``: the MuData the reference expects, missing modalities as empty rows, and our
    weights mapped into the reference's own module)."""
    key = ("reference", str(store_path), str(model_dir))
    if key in _CACHE:
        return _CACHE[key]
    from trainer.scvi_io import scvi_model, store_to_mudata

    module, info = load_model(model_dir)
    mdata = store_to_mudata(store_path)
    model = scvi_model(module, info, mdata)
    _CACHE[key] = (model, mdata)
    return model, mdata
