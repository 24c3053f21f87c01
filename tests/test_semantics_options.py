"""Inference options that do not apply are refused by name, never accepted and silently ignored.

.venv/bin/python -m pytest tests/test_semantics_options.py -q
"""

from __future__ import annotations

import pytest

from data.typed_config import ConfigError
from trainer.infer_config import InferConfig


@pytest.mark.parametrize("job", ["de", "da"])
@pytest.mark.parametrize("kw", [{"give_mean": False}, {"give_mean": False, "n_samples": 10}])
def test_de_da_refuse_posterior_draw_keys(job, kw):
    """de / da decode as the reference (de: posterior means of the sampled cells, da: one posterior draw per
    sampled cell). give_mean=false n_samples=10 was accepted and changed nothing in the table."""
    with pytest.raises(ConfigError, match=f"give_mean / n_samples do not apply to job={job}"):
        InferConfig(model_dir="m", store="s", output="o", job=job, **kw)
    InferConfig(model_dir="m", store="s", output="o", job=job)  # the defaults are fine
    InferConfig(model_dir="m", store="s", output="o", job="expression", **kw)  # where they apply, accepted


@pytest.mark.parametrize("groups", [{"group1": ["type_0"]}, {"group2": "type_1"}])
def test_cell_files_refuse_group_names(tmp_path_factory, tmp_path, groups):
    """de.group1 / de.group2 name groups of de.groupby; with de.cells1 they were accepted and ignored (the
    comparison silently became cells1 vs the rest)."""
    from data.store import open_store
    from tests.infer_utils import infer_cfg, trained_model
    from trainer.infer import infer
    from trainer.infer_config import DiffOptions
    from trainer.jobs.common import InferError

    store, run = trained_model(tmp_path_factory)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(open_store(store).read_obs().index[:50]))
    cfg = infer_cfg(store, run, tmp_path / "de.csv", job="de", de=DiffOptions(cells1=str(ids), **groups))
    with pytest.raises(InferError, match="not both"):
        infer(cfg)
    assert not (tmp_path / "de.csv").exists()
