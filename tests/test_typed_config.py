"""Strict config conversion: unknown or missing keys fail naming the key."""

from dataclasses import dataclass, field

import pytest
from omegaconf import MISSING, OmegaConf

from data.typed_config import ConfigError, to_typed


@dataclass
class Inner:
    lr: float = 1e-4
    name: str = MISSING


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    epochs: int = 3


def test_roundtrip():
    cfg = to_typed(OmegaConf.create({"inner": {"name": "a", "lr": 0.5}, "hydra": {"x": 1}}), Outer)
    assert isinstance(cfg, Outer) and cfg.inner.lr == 0.5 and cfg.epochs == 3


def test_unknown_key_named():
    with pytest.raises(ConfigError, match="inner.lrr"):
        to_typed({"inner": {"name": "a", "lrr": 1}}, Outer)


def test_missing_key_named():
    with pytest.raises(ConfigError, match="inner.name"):
        to_typed({}, Outer)


def test_bad_type_named():
    with pytest.raises(ConfigError, match="epochs"):
        to_typed({"inner": {"name": "a"}, "epochs": "many"}, Outer)


@dataclass
class WithList:
    inner: Inner = field(default_factory=Inner)
    keys: list[str] = field(default_factory=list)


@pytest.mark.parametrize(("cfg", "key"), [({"inner": 5}, "inner"), ({"keys": {"a": 1}}, "keys"),
                                          ({"inner": {"name": "a", "lr": {"x": 1}}}, "inner.lr")])
def test_a_section_of_the_wrong_kind_is_a_config_error_naming_it(cfg, key):
    # a mapping for a list was a raw omegaconf ConfigTypeError (a traceback from the CLIs), and a scalar
    # for a section named the key as '' ("bad config value for : Merge error ...")
    with pytest.raises(ConfigError, match=rf"bad config value for {key}: "):
        to_typed(cfg, WithList)


def test_a_scalar_for_a_list_says_how_to_write_the_list():
    # mva-infer de.group1=NK (the reference's group1="NK") said only "AnyNode is not a ListConfig"
    with pytest.raises(ConfigError, match=r"keys takes a list, e\.g\. keys=\[NK\] on the command line"):
        to_typed({"inner": {"name": "a"}, "keys": "NK"}, WithList)


@dataclass
class WithMappings:
    items: list[Inner] = field(default_factory=list)


def test_a_value_for_a_list_of_mappings_shows_a_mapping():
    # mva-build inputs=a.h5ad said "e.g. inputs=[a.h5ad]", which then failed as "str is not a subclass of InputConfig"
    with pytest.raises(ConfigError, match=r"items takes a list, e\.g\. items=\[\{lr: \.\.\., name: \.\.\.\}\] \(each "
                                          r"a mapping of lr, name\) on the command line"):
        to_typed({"items": "a.h5ad"}, WithMappings)
    with pytest.raises(ConfigError, match=r"bad config value for items\[0\]: each entry of items is a mapping, not a "
                                          r"value: e\.g\. items=\[\{lr: \.\.\., name: \.\.\.\}\]"):
        to_typed({"items": ["a.h5ad"]}, WithMappings)
