"""Turn a Hydra/OmegaConf config into a typed dataclass, failing loudly on unknown or missing keys.

Every entry point (mva-synth, mva-build, mva-train, mva-infer) converts its config here once, so a
typo in a key stops the run at start-up with the key named instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    ConfigTypeError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    ValidationError,
)

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem that names the offending key."""


def to_typed(cfg: DictConfig | dict[str, Any], schema: type[T], *, drop: tuple[str, ...] = ("hydra",)) -> T:
    """Merge ``cfg`` into the structured schema ``schema`` and return a dataclass instance.

    Unknown keys, missing mandatory values (``???``) and type mismatches raise ``ConfigError``.
    """
    if isinstance(cfg, DictConfig):
        try:
            raw = OmegaConf.to_container(cfg, resolve=True)
        except InterpolationResolutionError as exc:  # e.g. output='${nope}': a traceback before
            raise ConfigError(f"bad interpolation in {exc.full_key}: {exc.msg.splitlines()[0]}") from None
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
    except (ValidationError, ConfigTypeError) as exc:
        # a whole section of the wrong kind (data=5, inputs={...}) fails the merge with no key named
        key = exc.full_key or _culprit(base, raw)
        msg = exc.msg.splitlines()[0]
        if "is not a ListConfig" in msg:  # a scalar where a list belongs: say how to write one on the command line
            item = list_item_type(field_type(schema, key)[1])
            msg = f"{key} takes a list, e.g. {list_example(key, item, _value_at(raw, key))} on the command line"
        elif "is not a subclass of" in msg and "[" in key:  # inputs=[a.h5ad]: a list of values where mappings belong
            top = key.split("[")[0]
            item = list_item_type(field_type(schema, top)[1])
            msg = f"each entry of {top} is a mapping, not a value: e.g. {list_example(top, item)}"
        elif "Cannot convert 'ListConfig'" in msg:  # the opposite: a list where one value belongs
            given = _value_at(raw, key)
            one = given[0] if isinstance(given, list) and given else "..."
            msg = f"{key} takes one value, not a list: e.g. {key}={one}"
        raise ConfigError(f"bad config value for {key}: {msg}") from None
    return obj  # type: ignore[return-value]


def _culprit(base, raw: dict[str, Any], path: tuple[str, ...] = ()) -> str:
    """Dotted key of the first value whose merge alone fails (the deepest such key in a section)."""
    def fails(k: str, v: Any) -> bool:
        trial: Any = {k: v}
        for p in reversed(path):
            trial = {p: trial}
        try:
            OmegaConf.merge(base, trial)
        except Exception:  # noqa: BLE001 - any merge failure marks the culprit
            return True
        return False

    for k, v in raw.items():
        if fails(k, v):
            # a mapping where a mapping belongs: the bad value is inside it; else this key is the culprit
            inner = _culprit(base, v, (*path, str(k))) if isinstance(v, dict) and not fails(k, {}) else ""
            return inner or ".".join((*path, str(k)))
    return ""


def _value_at(raw: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def _fields(cls) -> dict[str, Any] | None:
    """{field name: resolved type} of a dataclass, or None for anything else (a leaf: any sub-key goes)."""
    import dataclasses
    import typing

    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def schema_keys(schema: type) -> list[str]:
    """Every dotted key of a (nested) dataclass schema, sections included."""
    out: list[str] = []

    def walk(cls, prefix: str) -> None:
        for name, typ in (_fields(cls) or {}).items():
            out.append(prefix + name)
            walk(typ, f"{prefix}{name}.")

    walk(schema, "")
    return out


def field_type(schema: type, dotted: str) -> tuple[bool, Any]:
    """(whether ``dotted`` is a field of the (nested) dataclass schema itself, its annotated type). A key under
    a dict or list field is not a field (False, None): a new one may be added there."""
    cls: Any = schema
    for part in dotted.split("."):
        fields = _fields(cls)
        if fields is None or part not in fields:
            return False, None
        cls = fields[part]
    return True, cls


def list_item_type(typ: Any) -> Any:
    """The element type of a ``list[X]`` (or ``list[X] | None``) annotation, else None."""
    import typing

    for t in (typ, *typing.get_args(typ)):
        if typing.get_origin(t) is list:
            return (typing.get_args(t) or (Any,))[0]
    return None


def list_example(key: str, item: Any, given: Any = "...") -> str:
    """How to write a list for ``key`` on the command line: of mappings where its items are dataclasses."""
    fields = list(_fields(item) or {})
    if not fields:
        return f"{key}=[{given}]"
    shown = ", ".join(f"{f}: {given if f == 'path' else '...'}" for f in fields[:2])
    return f"{key}=[{{{shown}}}] (each a mapping of {', '.join(fields)})"


def mapping_refusal(schema: type, key: str, given: str) -> str | None:
    """Why a mapping (``given``, as typed) cannot be the value of ``key``: a list or plain-valued field (str, int,
    float, bool, optionally None), which no mapping merges into. None for anything else: sections, dict fields and
    ``Any`` (e.g. transform_batch: a value or a list) are left to the config conversion."""
    import types
    import typing

    is_field, typ = field_type(schema, key)
    args = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    if not is_field or not all(a in (str, int, float, bool, type(None)) or typing.get_origin(a) is list for a in args):
        return None
    item = list_item_type(typ)
    if item is None:
        return f"{key} takes one value, not a mapping"
    if _fields(item) is None:
        return f"{key} takes a list, not a mapping: e.g. {list_example(key, item)}"
    return f"{key} takes a list of mappings: put it in brackets, {key}=[{given}]"


def has_key(schema: type, dotted: str) -> bool:
    """Whether ``dotted`` names a key of the schema (or lies under a non-dataclass field: a dict or list)."""
    cls: Any = schema
    for part in dotted.split("."):
        fields = _fields(cls)
        if fields is None:
            return True
        if part not in fields:
            return False
        cls = fields[part]
    return True
