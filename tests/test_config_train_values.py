"""mva-train values that passed load_config and then crashed late or trained silently wrong are refused at
start-up, naming the key (outputs of the runs before the fix in the comments: 400-cell store, 2 epochs).

    .venv/bin/python -m pytest tests/test_config_train_values.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data.typed_config import ConfigError
from tests.train_utils import as_cli, env, tiny_config, tiny_overrides, tiny_store
from trainer.config import VALIDATION_KEYS, load_config

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def _compose(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose(config_name="train", overrides=["data.store=/x", *overrides])


@pytest.mark.parametrize("overrides,key", [
    # KeyError: 'loss' traceback after the first validation (only early stopping checked the name)
    (("run.early_stopping=false", "run.monitor=loss"), "run.monitor"),
    (("run.early_stopping=false", "run.keep=best", "run.monitor=''"), "run.monitor"),
    # grad_clip 0 zeroed every gradient (validation 5,264 vs 5,160 unclipped: no training), -1 reversed
    # them (5,329: Adam climbed the loss), NaN made every step non-finite
    (("optim.grad_clip=0",), "optim.grad_clip"),
    (("optim.grad_clip=-1",), "optim.grad_clip"),
    (("optim.grad_clip=nan",), "optim.grad_clip"),
    # torch's 'ValueError: Invalid learning rate / weight_decay / epsilon value' traceback once the store
    # was open; lr=inf and eps=0 stopped after run.max_bad_steps non-finite steps; kappa -1 trained the
    # encoder to help the batch classifier
    (("optim.lr=nan",), "optim.lr"),
    (("optim.lr=inf",), "optim.lr"),
    (("optim.eps=0",), "optim.eps"),
    (("optim.eps=-1",), "optim.eps"),
    (("optim.weight_decay=-1",), "optim.weight_decay"),
    (("optim.weight_decay=nan",), "optim.weight_decay"),
    (("optim.classifier_lr=-1",), "optim.classifier_lr"),
    (("optim.classifier_lr=0",), "optim.classifier_lr"),
    (("optim.classifier_eps=-1",), "optim.classifier_eps"),
    (("optim.classifier_weight_decay=-1",), "optim.classifier_weight_decay"),
    (("optim.kappa=-1",), "optim.kappa"),
    (("optim.kappa=nan",), "optim.kappa"),
    # a negative warm-up meant none; a step warm-up next to an epoch warm-up was ignored
    (("optim.n_epochs_kl_warmup=-1",), "optim.n_epochs_kl_warmup"),
    (("optim.n_epochs_kl_warmup=null", "optim.n_steps_kl_warmup=-5"), "optim.n_steps_kl_warmup"),
    (("optim.n_steps_kl_warmup=1000",), "optim.n_steps_kl_warmup"),
    # NaN: keep=best shipped epoch 0's weights (validation 5,208) though epoch 1 was better (5,160)
    (("run.min_delta=nan",), "run.min_delta"),
    (("run.min_delta=-1",), "run.min_delta"),
    # 'ValueError: the shuffle needs seed >= 0' / 'Overflow when unpacking long long' tracebacks
    (("run.seed=-1",), "run.seed"),
    (("run.seed=9223372036854775808",), "run.seed"),
    # '' trained into the working directory (checkpoints/, model/, config.yaml next to the caller)
    (("run.output_dir=''",), "run.output_dir"),
    (("run.keep_checkpoints=-1",), "run.keep_checkpoints"),
    (("data.cache_validation_mb=-1",), "data.cache_validation_mb"),
    (("dist.timeout_s=0",), "dist.timeout_s"),
    (("dist.zero_stage=2",), "dist.zero_stage"),  # with the default dist=ddp: trained without ZeRO, silently
    # the schedule's ValueError at the first step, after the store was opened
    (("optim.min_kl_weight=0.8", "optim.max_kl_weight=0.5"), "optim.min_kl_weight"),
    (("optim.min_kl_weight=-0.1",), "optim.min_kl_weight"),
    (("optim.max_kl_weight=nan",), "optim.max_kl_weight"),
    (("optim.max_kl_weight=inf",), "optim.max_kl_weight"),
])
def test_bad_values_are_named_at_start_up(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_compose(*overrides))


@pytest.mark.parametrize("overrides", [
    ("optim.grad_clip=1.5",), ("optim.grad_clip=inf",), ("optim.kappa=0",), ("optim.classifier_eps=0",),
    ("optim.weight_decay=0",), ("optim.eps=1e-12",), ("run.min_delta=1e9",), ("run.min_delta=inf",),
    ("run.seed=9223372036854775807",), ("run.keep_checkpoints=0",), ("data.cache_validation_mb=0",),
    ("optim.n_epochs_kl_warmup=0", "optim.n_steps_kl_warmup=7"),  # 0 = step warm-up, as the loop reads it
    ("optim.n_epochs_kl_warmup=null", "optim.n_steps_kl_warmup=7"), ("optim.n_steps_kl_warmup=0",),
    ("run.monitor=elbo_validation",), ("dist=deepspeed", "dist.zero_stage=1"),
    ("optim.max_kl_weight=0",), ("optim.min_kl_weight=0.5", "optim.max_kl_weight=0.5"),
])
def test_boundary_values_stay_valid(overrides):
    load_config(_compose(*overrides))


def test_monitor_names_are_the_loops_validation_keys():
    from trainer import loop

    assert VALIDATION_KEYS == loop.VALIDATION_KEYS


def test_a_monitor_typo_no_longer_crashes_a_run_without_early_stopping(tmp_path):
    """The real command: before the fix it trained a whole epoch, then died with a KeyError traceback."""
    store = tiny_store(tmp_path / "store", n_cells=200)
    ov = tiny_overrides(store, tmp_path / "run", **{"run.early_stopping": False, "run.monitor": "loss",
                                                    "run.epochs": 1})
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "trainer.train", *as_cli(ov)], check=False, cwd=root,
                       env=env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "mva-train: error: run.monitor must be one of" in r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_classifier_weight_decay_follows_weight_decay_unless_set(tmp_path):
    """The reference's classifier Adam takes the plan's weight_decay (MULTIVI.train(weight_decay=0) trains
    both without decay); ours kept 1e-3 for the classifier whatever optim.weight_decay said."""
    from trainer.checkpoint import complete_checkpoints
    from trainer.checkpoint_checks import safe_load
    from trainer.train import train

    assert load_config(_compose()).optim.classifier_weight_decay == 1e-3  # the default: the reference's
    assert load_config(_compose("optim.weight_decay=0")).optim.classifier_weight_decay == 0
    set_apart = load_config(_compose("optim.weight_decay=0", "optim.classifier_weight_decay=0.01"))
    assert (set_apart.optim.weight_decay, set_apart.optim.classifier_weight_decay) == (0, 0.01)
    # the optimizers the trainer builds (read back from its checkpoint)
    store = tiny_store(tmp_path / "store", n_cells=200)
    train(tiny_config(store, tmp_path / "run", **{"optim.weight_decay": 0.0, "run.epochs": 1}))
    state = safe_load(complete_checkpoints(tmp_path / "run")[-1] / "model.pt")
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0
    assert state["classifier_optimizer"]["param_groups"][0]["weight_decay"] == 0  # was 1e-3
