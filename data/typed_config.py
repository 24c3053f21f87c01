"""Turn a Hydra/OmegaConf config into a typed dataclass, failing loudly on unknown or missing keys.

Every entry point (mva-synth, mva-build, mva-train, mva-infer) converts its config here once, so a
typo in a key stops the run at start-up with the key named instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem that names the offending key."""


def to_typed(cfg: DictConfig | dict[str, Any], schema: type[T], *, drop: tuple[str, ...] = ("hydra",)) -> T:
    """Merge ``cfg`` into the structured schema ``schema`` and return a dataclass instance.

    Unknown keys, missing mandatory values (``???``) and type mismatches raise ``ConfigError``.
    """
    if isinstance(cfg, DictConfig):
        raw = OmegaConf.to_container(cfg, resolve=True)
    else:
        raw = dict(cfg)
    for key in drop:
        raw.pop(key, None)
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, raw)
        obj = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        raise ConfigError(f"unknown config key: {exc.full_key or exc.key} ({exc.msg.splitlines()[0]})") from None
    except MissingMandatoryValue as exc:
        raise ConfigError(f"missing config value: {exc.full_key}") from None
    except ValidationError as exc:
        raise ConfigError(f"bad config value for {exc.full_key}: {exc.msg.splitlines()[0]}") from None
    return obj  # type: ignore[return-value]
