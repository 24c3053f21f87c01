"""Reading a store that changed under the reader: rebuilt in place while open, files lost from a store
built before the file manifest, a build killed before its rename (review 9).

    .venv/bin/python -m pytest tests/test_store_reads.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from data.store import StoreError, open_store
from data.synthetic import write_synthetic_store


def _synth(path, seed=1, **kw):
    return write_synthetic_store(
        path, n_cells=400, n_genes=30, n_regions=50, seed=seed, shard_size=200, progress=False, **kw
    )


def test_rows_and_obs_of_a_store_rebuilt_in_place_are_refused_not_mixed(tmp_path):
    # read_rows keeps each shard's indptr: after a rebuild it sliced the new store's counts at the old
    # store's offsets and returned other cells' counts (row sums 4736 instead of 6501) without an error
    p = _synth(tmp_path / "s.zarr")
    st = open_store(p)
    before = st.read_rows("rna", 0, 0, 5).toarray()
    assert len(st.read_shard_obs(1)) == 200
    _synth(p, seed=2, overwrite=True)
    with pytest.raises(StoreError, match="was replaced while it was being read"):
        st.read_rows("rna", 0, 0, 5)
    with pytest.raises(StoreError, match="was replaced while it was being read"):
        st.read_obs()
    assert not np.array_equal(open_store(p).read_rows("rna", 0, 0, 5).toarray(), before)
