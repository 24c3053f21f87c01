"""Notebook API (trainer/api.py) semantics against the jobs' and the reference's.

.venv/bin/python -m pytest tests/test_semantics_api.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.infer_utils import trained_model
from trainer.api import APIError, load
from trainer.scvi_io import store_to_mudata


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store, run = trained_model(tmp_path_factory)
    return store, load(run)


@pytest.mark.parametrize("mod", ["rna", "atac"])
@pytest.mark.parametrize("how", ["log1p", "negative", "nan"])
def test_in_memory_input_that_is_not_raw_counts_is_refused(trained, mod, how):
    """A normalised / log1p X gave other latents without a word (0.79 max change on a test model); the store
    builder refuses such input and the reference warns. Now one line naming the modality and the cell."""
    store, model = trained
    cells = np.arange(40)
    mdata = store_to_mudata(store, cells)
    z = model.latent(mdata)  # raw counts: accepted
    x = mdata.mod[mod].X.copy()
    x.data = {"log1p": np.log1p(x.data), "negative": -x.data, "nan": np.full_like(x.data, np.nan)}[how]
    mdata.mod[mod].X = x
    with pytest.raises(
        APIError, match=rf"the {mod} counts must be non-negative integers .* cell 'cell_\d+' has"
    ):
        model.latent(mdata)
    assert z.shape == (len(cells), model.module.n_latent)


def test_threshold_zero_is_dense_as_the_job_and_the_reference(trained):
    """threshold=0 keeps every value; the reference (``if threshold:``) and the accessibility job then return
    a dense matrix, the API returned a CSR holding every entry."""
    store, model = trained
    dense = model.accessibility(store)
    zero = model.accessibility(store, threshold=0)
    assert isinstance(zero, np.ndarray)
    np.testing.assert_array_equal(zero, dense)
    assert model.accessibility(store, threshold=0.5).nnz < dense.size  # a real threshold: sparse
