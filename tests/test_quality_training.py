"""Our side of the quality harness trains with the reference's epoch semantics (docs/quality.md,
"Differences"): the same training cells, ceil(n / batch) steps per epoch, every training cell exactly
once per epoch and a SHORT last batch (scvi-tools' drop_last=False), not one padded with repeats.
Real BMMC cells, a real mva-build store and the real trainer stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.split import cell_hash, is_validation
from trainer.config import ConfigError, DataConfig
from trainer.dist import DistInfo
from trainer.quality.data import read_pair
from trainer.quality.scenario import make_scenario
from trainer.quality.settings import TrainSettings

BMMC = Path("/work/shared/data/neurips2021_bmmc_multiome_starter")
if not BMMC.is_dir():
    BMMC = Path(__file__).resolve().parents[2] / "shared/data/neurips2021_bmmc_multiome_starter"
ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def view_store(tmp_path_factory):
    from trainer.quality.ours import build_view_store

    data = read_pair(BMMC / "bmmc_starter_rna.h5ad", BMMC / "bmmc_starter_atac.h5ad", "batch", "cell_type")
    sc = make_scenario(data.n_cells, 0.5, 2)
    store, order = build_view_store(data, sc, tmp_path_factory.mktemp("view"))
    return data, store, order


def test_epoch_has_the_reference_batches(view_store, tmp_path):
    from data.store import open_store
    from trainer.loop import make_stream
    from trainer.quality.ours import ours_config

    data, store, order = view_store
    s = TrainSettings(epochs=1, batch_size=128)
    cfg = ours_config(store, s, tmp_path / "run")
    # the reference trains on exactly the harness's non-validation cells (harness.run_one)
    ref_train = set(data.cell_ids[~is_validation(cell_hash(data.cell_ids), s.val_fraction)])
    n = len(ref_train)
    assert n % s.batch_size >= 3  # scvi-tools would move a 1-2 cell remainder out of training
    stream = make_stream(open_store(store), cfg, "train", ONE_PROCESS)
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        sizes, seen = [], []
        for batch in stream:
            sizes.append(len(batch["index"]))
            seen += batch["index"].tolist()
        # ceil(n / batch) steps, the last one short (DataLoader with drop_last=False)
        assert sizes == [s.batch_size] * (n // s.batch_size) + [n % s.batch_size]
        assert len(seen) == len(set(seen)) == n  # every training cell once, nothing repeated
        assert set(data.cell_ids[order[seen]]) == ref_train


def test_remainder_none_needs_one_process(view_store, tmp_path):
    """Ranks could get different numbers of batches: refused before anything is built."""
    from trainer.loop import _run
    from trainer.quality.ours import ours_config

    _, store, _ = view_store
    cfg = ours_config(store, TrainSettings(epochs=1), tmp_path / "run")
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="remainder=none needs one process"):
        _run(cfg, two)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="drop, pad or none"):
        DataConfig(store="x", remainder="wrap")


def test_short_last_batch_trains(view_store, tmp_path):
    """One epoch through the real trainer: ceil(n / batch) steps, all finite."""
    import json

    from trainer.quality.ours import ours_config
    from trainer.train import train

    data, store, _ = view_store
    s = TrainSettings(epochs=1, batch_size=128, n_epochs_kl_warmup=1)
    res = train(ours_config(store, s, tmp_path / "run"))
    n = int((~is_validation(cell_hash(data.cell_ids), s.val_fraction)).sum())
    assert res.steps == -(-n // s.batch_size) and res.skipped_steps == 0
    losses = [json.loads(line)["loss"] for f in Path(res.run_dir).glob("metrics*.jsonl")
              for line in f.read_text().splitlines() if '"kind": "train"' in line]
    assert len(losses) == res.steps and np.all(np.isfinite(losses))


def test_runs_of_an_older_harness_are_not_reused():
    """A stored run trained with the padded last batch (no harness_version) must be rerun, not reused."""
    from dataclasses import asdict

    from trainer.quality.harness import asdict_seedless

    s = TrainSettings(epochs=100, n_epochs_kl_warmup=50)
    old = {k: v for k, v in asdict(s).items() if k != "harness_version"}
    assert asdict_seedless(s, {"seed": 3, "settings": {**old, "seed": 3}}) != {**old, "seed": 3}
    assert asdict_seedless(s, {"seed": 3}) == {**asdict(s), "seed": 3}


def test_stored_runs_from_before_the_adversarial_field_are_reused_as_adversarial():
    """Runs stored before TrainSettings.adversarial existed trained with the classifier: they match the
    default settings, not the --no-adversarial ablation; a version-1 run still matches neither."""
    from dataclasses import asdict

    from trainer.quality.harness import asdict_seedless, stored_settings

    on, off = TrainSettings(epochs=300, n_epochs_kl_warmup=150), TrainSettings(epochs=300, n_epochs_kl_warmup=150,
                                                                            adversarial=False)
    v2 = {"seed": 4, "settings": {k: v for k, v in {**asdict(on), "seed": 4}.items() if k != "adversarial"}}
    assert stored_settings(v2) == asdict_seedless(on, v2)
    assert stored_settings(v2) != asdict_seedless(off, v2)
    v1 = {"seed": 4, "settings": {k: v for k, v in v2["settings"].items() if k != "harness_version"}}
    assert stored_settings(v1) != asdict_seedless(on, v1)


@pytest.mark.reference
def test_ablations_swap_our_random_sources_for_the_reference(view_store, tmp_path):
    """--ours-init reference: our trainer's module starts from MULTIVI's initial weights for the seed;
    --ours-noise global: the loop passes no noise, so the module draws it from the global generator.
    Outside the ablation the trainer is untouched."""
    from data.store import open_store
    from trainer import loop
    from trainer.quality.ours import _ablation, ours_config
    from trainer.quality.reference import reference_initial_state

    data, store, _ = view_store
    s = TrainSettings(epochs=1, seed=3, ours_init="reference", ours_noise="global")
    sc = make_scenario(data.n_cells, 0.5, 2)
    val = is_validation(cell_hash(data.cell_ids), s.val_fraction)
    cats = sorted(set(data.batch.tolist()))
    init = reference_initial_state(data, sc, s, np.flatnonzero(~val), cats)
    again = reference_initial_state(data, sc, s, np.flatnonzero(~val), cats)
    assert all(torch.equal(v, again[k]) for k, v in init.items())  # same seed, same start
    cfg = ours_config(store, s, tmp_path / "run")
    meta = open_store(store).meta
    own = loop.build_module(meta, cfg).state_dict()
    with _ablation(s, init):
        swapped = loop.build_module(meta, cfg).state_dict()
        assert loop.step_noise(0, 0, 0, 4, 4, 3, torch.device("cpu")) is None
    assert all(torch.equal(swapped[k], v) for k, v in init.items())
    assert any(not torch.equal(own[k], v) for k, v in init.items())  # our own draw differs: not vacuous
    assert loop.step_noise(0, 0, 0, 4, 4, 3, torch.device("cpu")).shape == (4, 3)
    assert loop.build_module(meta, cfg).state_dict().keys() == own.keys()
    with pytest.raises(ValueError, match="ours_init"):
        TrainSettings(ours_init="theirs")


@pytest.mark.reference
def test_reference_can_start_from_our_initial_weights(view_store):
    """--ref-init ours: MULTIVI's module holds exactly the weights our trainer starts from for the seed
    (mapped into its layout), and the global RNG the reference trains with is left where it was."""
    import scvi

    from data.store import open_store
    from trainer.config import load_config
    from trainer.export import build_module
    from trainer.loop import seed_everything
    from trainer.quality.reference import _load_our_initial_weights, reference_mudata
    from trainer.reference import ours_state_from_reference

    data, store, _ = view_store
    sc = make_scenario(data.n_cells, 0.5, 2)
    val = is_validation(cell_hash(data.cell_ids), 0.1)
    cats = sorted(set(data.batch.tolist()))
    seed_everything(5)
    trainer_start = build_module(open_store(store).meta, load_config({"data": {"store": str(store)}})).state_dict()
    scvi.settings.seed = 5
    mdata = reference_mudata(data, sc, np.flatnonzero(~val), cats)
    scvi.model.MULTIVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"},
                                    batch_key="batch")
    model = scvi.model.MULTIVI(mdata)
    before = torch.get_rng_state()
    _load_our_initial_weights(model, data, cats, int((~val).sum()), 5)
    assert torch.equal(torch.get_rng_state(), before)
    back = ours_state_from_reference(model.module.state_dict(), trainer_start)
    assert all(torch.equal(back[k], v) for k, v in trainer_start.items())
