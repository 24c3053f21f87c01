"""The reference side: scvi-tools 1.5.1 ``MULTIVI`` on the same training view, same cells, same split.

The MuData holds the training view of the NON-validation cells (the store's hash split), with a
hidden modality as an all-zero row, which is how MULTIVI recognises a missing modality. After
training, its weights are mapped into our ``MultiVAE`` so one evaluator scores both sides; the mapped
module's latent is checked against MULTIVI's own ``get_latent_representation``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from trainer.module import MultiVAE
from trainer.quality.data import PairedData
from trainer.quality.scenario import Scenario, training_view
from trainer.quality.settings import TrainSettings


@dataclass
class ReferenceRun:
    module: MultiVAE  # our module holding the reference's trained weights
    finite: bool  # every epoch's logged training loss was finite
    latent_max_abs_diff: float  # mapped module vs MULTIVI.get_latent_representation (same cells)
    train_seconds: float


def reference_mudata(data: PairedData, sc: Scenario, cells: np.ndarray, batch_categories: list[str]):
    """MuData of ``cells`` in the training view; hidden modalities are zero rows (MULTIVI's convention)."""
    import anndata as ad
    import mudata as md

    rna, atac = training_view(sc, data.rna, data.atac)
    obs = pd.DataFrame({"batch": pd.Categorical(data.batch[cells], categories=batch_categories)},
                       index=pd.Index(data.cell_ids[cells], dtype=str))
    return md.MuData({
        "rna": ad.AnnData(sp.csr_matrix(rna[cells], dtype=np.float32), obs=obs.copy(),
                          var=pd.DataFrame(index=pd.Index(data.gene_names, dtype=str))),
        "atac": ad.AnnData(sp.csr_matrix(atac[cells], dtype=np.float32), obs=obs.copy(),
                           var=pd.DataFrame(index=pd.Index(data.region_names, dtype=str)))})


def train_reference(data: PairedData, sc: Scenario, s: TrainSettings, train_cells: np.ndarray,
                    batch_categories: list[str]) -> ReferenceRun:
    import scvi
    import torch

    from trainer.config import ModelConfig
    from trainer.reference import ours_state_from_reference

    scvi.settings.seed = s.seed
    torch.set_num_threads(1)
    mdata = reference_mudata(data, sc, train_cells, batch_categories)
    scvi.model.MULTIVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"},
                                    batch_key="batch")
    model = scvi.model.MULTIVI(mdata, dropout_rate=s.dropout_rate)
    if s.ref_init == "ours":  # ablation: the reference starts where our trainer starts for this seed
        _load_our_initial_weights(model, data, batch_categories, len(train_cells), s.seed)
    t0 = time.perf_counter()
    model.train(max_epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, n_epochs_kl_warmup=s.n_epochs_kl_warmup,
                train_size=1.0, early_stopping=False, adversarial_mixing=s.adversarial, accelerator="cpu", devices=1, enable_progress_bar=False,
                datasplitter_kwargs={"drop_last": False})
    seconds = time.perf_counter() - t0
    finite = all(np.all(np.isfinite(np.asarray(h, dtype=float))) for k, h in model.history.items()
                 if k.endswith("_train"))
    ours = MultiVAE(n_genes=len(data.gene_names), n_regions=len(data.region_names),
                    n_batch=max(1, len(batch_categories)), n_obs=len(train_cells), **asdict(ModelConfig()))
    ours.load_state_dict(ours_state_from_reference(model.module.state_dict(), ours.state_dict()))
    return ReferenceRun(ours.eval(), finite, _latent_check(model, mdata, ours, batch_categories), seconds)


def _load_our_initial_weights(model, data: PairedData, batch_categories: list[str], n_obs: int, seed: int) -> None:
    """Our module as the trainer builds it (global seed, then the constructor), mapped into MULTIVI's
    module; the global RNG is restored afterwards, so the reference's own random stream (shuffling,
    dropout, noise) continues exactly as without the swap."""
    import torch

    from trainer.config import ModelConfig
    from trainer.reference import reference_state_from_ours

    state = torch.get_rng_state()
    torch.manual_seed(seed)
    ours = MultiVAE(n_genes=len(data.gene_names), n_regions=len(data.region_names),
                    n_batch=max(1, len(batch_categories)), n_obs=n_obs, **asdict(ModelConfig()))
    torch.set_rng_state(state)
    model.module.load_state_dict(reference_state_from_ours(ours.state_dict(), model.module.state_dict()))


def reference_initial_state(data: PairedData, sc: Scenario, s: TrainSettings, train_cells: np.ndarray,
                            batch_categories: list[str]) -> dict:
    """The weights MULTIVI starts from for this seed (built exactly as ``train_reference`` builds it,
    before any training), in our module's layout: for the ``ours_init="reference"`` ablation."""
    import scvi

    from trainer.config import ModelConfig
    from trainer.reference import ours_state_from_reference

    scvi.settings.seed = s.seed
    mdata = reference_mudata(data, sc, train_cells, batch_categories)
    scvi.model.MULTIVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"},
                                    batch_key="batch")
    model = scvi.model.MULTIVI(mdata, dropout_rate=s.dropout_rate)
    ours = MultiVAE(n_genes=len(data.gene_names), n_regions=len(data.region_names),
                    n_batch=max(1, len(batch_categories)), n_obs=len(train_cells), **asdict(ModelConfig()))
    return ours_state_from_reference(model.module.state_dict(), ours.state_dict())


def _latent_check(model, mdata, ours: MultiVAE, batch_categories: list[str]) -> float:
    """Max |latent difference| between MULTIVI and the mapped module on the training cells whose
    visible modalities are non-empty (MULTIVI infers masks from row sums, we use explicit masks)."""
    from trainer import predict
    from trainer.quality.evaluate import _map

    ref_z = model.get_latent_representation(mdata)
    rna, atac = sp.csr_matrix(mdata["rna"].X), sp.csr_matrix(mdata["atac"].X)
    mask = np.stack([np.diff(rna.indptr) > 0, np.diff(atac.indptr) > 0], 1)
    codes = np.array(mdata["rna"].obs["batch"].cat.codes, dtype=np.int64)
    z = _map(lambda b: predict.latent(ours, b), rna, atac, mask, codes)
    ok = mask.any(1)
    return float(np.abs(z[ok] - ref_z[ok]).max())
