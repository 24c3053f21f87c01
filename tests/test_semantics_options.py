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
