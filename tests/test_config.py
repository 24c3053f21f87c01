"""Typed training config: every conf/ preset composes and converts; bad keys fail naming the key.

    .venv/bin/python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data.typed_config import ConfigError
from trainer.config import TrainConfig, config_from_json, config_to_json, load_config

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def _compose(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("extra", [["data.store=/x"], ["+experiment=demo"], ["+experiment=bmmc"],
                                   ["+experiment=atlas_1m"], ["+experiment=demo", "dist=deepspeed"]])
def test_presets_compose_into_the_typed_config(extra):
    cfg = load_config(_compose(*extra))
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.gene_likelihood == "zinb" and cfg.optim.classifier_eps == 0.01  # reference defaults


def test_experiment_presets_override_groups():
    cfg = load_config(_compose("+experiment=atlas_1m", "dist=deepspeed"))
    assert cfg.dist.backend == "deepspeed" and cfg.dist.zero_stage == 2 and cfg.dist.precision == "bf16"
    assert cfg.optim.n_epochs_kl_warmup is None and cfg.optim.n_steps_kl_warmup == 20000
    assert cfg.data.batch_size == 1024


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(_compose("data.store=/x", "+optim.learning_rate=1"))


def test_missing_store_is_named():
    with pytest.raises(ConfigError, match=r"data\.store"):
        load_config(_compose())


@pytest.mark.parametrize("override,key", [("dist.backend=horovod", "dist.backend"),
                                          ("dist.zero_stage=3", "dist.zero_stage"),
                                          ("run.keep=first", "run.keep"),
                                          ("logger.wandb_mode=loud", "logger.wandb_mode"),
                                          ("data.batch_size=abc", "data.batch_size"),
                                          # accepted before, then crashed (log_every: modulo by zero) or
                                          # misbehaved (patience 0 stopped after an improving epoch)
                                          ("logger.log_every=0", "logger.log_every"),
                                          ("run.patience=0", "run.patience"),
                                          ("run.max_steps=0", "run.max_steps"),
                                          ("run.checkpoint_every_steps=0", "run.checkpoint_every_steps"),
                                          ("run.max_bad_steps=0", "run.max_bad_steps"),
                                          ("data.num_workers=-1", "data.num_workers"),
                                          # were a ValueError traceback once the store was open
                                          ("model.gene_likelihood=zinbb", "model.gene_likelihood"),
                                          ("model.dispersion=cell", "model.dispersion"),
                                          # dropout -0.1 trained without dropout, 1.0 zeroed every
                                          # encoder activation; sizes < 1 crashed in the first forward
                                          ("model.dropout_rate=-0.1", "model.dropout_rate"),
                                          ("model.dropout_rate=1.0", "model.dropout_rate"),
                                          ("model.n_latent=0", "model.n_latent"),
                                          ("model.n_hidden=-5", "model.n_hidden"),
                                          ("model.n_layers_decoder=0", "model.n_layers_decoder")])
def test_bad_values_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_compose("data.store=/x", override))


def test_workers_need_prefetch():
    # torch's DataLoader asserts on prefetch_factor=0 with workers, after the run has started
    with pytest.raises(ConfigError, match=r"data\.prefetch must be >= 1 with data\.num_workers=2"):
        load_config(_compose("data.store=/x", "data.num_workers=2", "data.prefetch=0"))
    assert load_config(_compose("data.store=/x", "data.num_workers=0", "data.prefetch=0")).data.prefetch == 0


@pytest.mark.parametrize("overrides", [("run.validate_every_epochs=0",),
                                       ("run.validate_every_epochs=0", "run.early_stopping=false", "run.keep=best"),
                                       ("run.validate_every_epochs=-1", "run.early_stopping=false")])
def test_validation_off_needs_what_reads_it_off(overrides):
    with pytest.raises(ConfigError, match=r"run\.validate_every_epochs"):
        load_config(_compose("data.store=/x", *overrides))
    ok = load_config(_compose("data.store=/x", "run.validate_every_epochs=0", "run.early_stopping=false"))
    assert ok.run.validate_every_epochs == 0


def test_validation_off_names_only_the_settings_that_read_it():
    """With early stopping on and keep=last it said "run.keep='last' read it", which it does not."""
    for extra, readers, fixes in ((["run.keep=last"], "run.early_stopping=True reads it", "run.early_stopping=false,"),
                                  (["run.early_stopping=false", "run.keep=best"], "run.keep='best' reads it",
                                   "run.keep=last,"),
                                  (["run.keep=best"], "run.early_stopping=True and run.keep='best' read it",
                                   "run.early_stopping=false and run.keep=last,")):
        with pytest.raises(ConfigError) as exc:
            load_config(_compose("data.store=/x", "run.validate_every_epochs=0", *extra))
        assert f"but {readers}: set {fixes} or validate" in str(exc.value) and "'last' read" not in str(exc.value)


def test_model_options_match_the_module_signature():
    import inspect

    from trainer.module import MultiVAE

    params = inspect.signature(MultiVAE).parameters
    opts = {k: v.default for k, v in params.items()
            if k not in ("self", "n_genes", "n_regions", "n_batch", "n_cats_per_cov", "n_continuous_cov", "n_obs")}
    from dataclasses import asdict

    assert asdict(load_config({"data": {"store": "/x"}}).model) == opts


def test_json_round_trip():
    cfg = load_config(_compose("+experiment=demo"))
    assert config_from_json(config_to_json(cfg)) == cfg
