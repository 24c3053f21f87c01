"""A resumed run continues the checkpoint's run: settings that shape its training must be the same.

``resume=auto`` restores the optimizer state, and with it the learning rate, weight decay and eps that
were saved: a run resumed with ``optim.lr=0.5`` silently kept the old rate while ``config.yaml`` and the
exported ``model.json`` recorded 0.5; a changed ``model.dropout_rate`` or ``run.seed`` would apply from
the resume on, so the result matched neither setting. Every difference is therefore refused by name,
except the keys below, which change how long, where, or how fast the same run goes, not its arithmetic.
"""

from __future__ import annotations

import json
import operator
from typing import Any

from trainer.config import ConfigError, TrainConfig, config_to_json

# how long / where / how fast: a longer run (epochs, max_steps) is the normal reason to resume
RESUMABLE = frozenset({
    "run.epochs", "run.max_steps", "run.output_dir", "run.resume", "run.checkpoint_every_steps",
    "run.keep_checkpoints", "run.clear_stale_lock", "run.max_bad_steps",
    "data.store",  # the store's content is checked by its fingerprint; it may have moved
    "data.num_workers", "data.prefetch", "data.cache_validation_mb",  # the batch order does not depend on them
    "model.native_kernels", "model.compile_kernels",  # the same math, other float rounding: OTHER_ROUNDING
    "dist.timeout_s", "dist.find_unused_parameters", "dist.device",
})


# resumable, but the continued run is not bit for bit the uninterrupted one (other kernels add in another
# order: 1.5e-8 apart after a few steps), which a resume then says, as it says a changed thread count
OTHER_ROUNDING = ("model.native_kernels", "model.compile_kernels")

# settings whose default changed after they were added: a checkpoint without the key ran the old default
ABSENT_WAS = {"data.remainder": "drop"}  # the default until remainder=even (every cell once per epoch)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


# settings compared by a rule of their own: query.reference may move (trainer/query.py check_resumable checks
# it against the run's record), but a query run is not resumed as a plain one, or back
_SAME = {"query.reference": lambda a, b: bool(a) == bool(b)}

# what the optimizers' state dicts carry (param_groups): a resumed optimizer keeps the checkpoint's value
_OPTIMIZER_STATE = ("optim.lr", "optim.weight_decay", "optim.eps", "optim.classifier_lr", "optim.classifier_eps",
                    "optim.classifier_weight_decay")


def check_same_settings(saved_config: str | None, cfg: TrainConfig, path: str) -> None:
    """Raise ConfigError naming every setting (outside RESUMABLE and logger.*) that differs from the
    checkpoint's; nothing to compare for a checkpoint without its config."""
    if not saved_config:
        return
    old, new = _flat(json.loads(saved_config)), _flat(json.loads(config_to_json(cfg)))
    # a setting added after the checkpoint was written is absent from its config: the code then did what
    # the new setting's default does (which is how settings are added), so absent reads as the default;
    # compared as None it was refused as "(None -> default)", a value nobody can set back
    defaults = {**_flat(json.loads(config_to_json(TrainConfig()))), **ABSENT_WAS}
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    changed = [k for k in sorted(old.keys() | new.keys())
               if k not in RESUMABLE and not k.startswith("logger.")
               and not _SAME.get(k, operator.eq)(old.get(k), new.get(k))]
    if changed:
        diff = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        # the optimizer's reason only where an optimizer setting changed (it blamed the lr for model.n_hidden)
        why = (" (its optimizer state would keep the old value)" if any(k in _OPTIMIZER_STATE for k in changed)
               else "")
        raise ConfigError(f"resuming {path} with other settings: {diff}{more}. A resumed run continues with its "
                          f"checkpoint's settings{why}; set them back, or start a new run in another run.output_dir")


def rounding_changes(saved_config: str | None, cfg: TrainConfig) -> list[str]:
    """The OTHER_ROUNDING settings that differ from the checkpoint's, as 'key (old -> new)'."""
    if not saved_config:
        return []
    old, new = _flat(json.loads(saved_config)), _flat(json.loads(config_to_json(cfg)))
    return [f"{k} ({old[k]!r} -> {new.get(k)!r})" for k in OTHER_ROUNDING if k in old and old[k] != new.get(k)]
