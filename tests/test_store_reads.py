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


_KILLED_BUILD = """
import os, signal, sys
from data.writer import StoreSchema, StoreWriter
w = StoreWriter(sys.argv[1], StoreSchema(gene_names=["g"], region_names=["chr1:1-2"]))
os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer or a job's time limit does
"""


def test_a_killed_builds_tmp_dir_is_removed_by_the_next_build_and_other_leftovers_are_named(tmp_path):
    # a SIGKILLed build left <out>.tmp-* (with preshuffle: a full copy of the input) that nothing ever removed
    # or mentioned
    import subprocess
    import sys

    from data.leftovers import claim
    from tests.train_utils import ROOT

    out = tmp_path / "s.zarr"
    r = subprocess.run(
        [sys.executable, "-c", _KILLED_BUILD, str(out)], cwd=ROOT, capture_output=True, check=False
    )
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    (killed,) = tmp_path.glob("s.zarr.tmp-*")
    running = tmp_path / "s.zarr.tmp-running"  # a build of this process: still running
    running.mkdir()
    claim(running)
    unmarked = tmp_path / "s.zarr.tmp-unmarked"  # no owner to ask (an older version, or just created)
    unmarked.mkdir()
    old = tmp_path / "s.zarr.old-1234abcd"  # a previous store an interrupted overwrite moved aside
    old.mkdir()
    other = tmp_path / "t.zarr.tmp-0000"  # another output's
    other.mkdir()
    with pytest.warns(UserWarning) as rec:
        _synth(out)
    msgs = [str(w.message) for w in rec if "s.zarr." in str(w.message)]
    assert len(msgs) == 4, msgs
    assert any(
        m.startswith(f"removed {killed}: an unfinished build of {out} left by build process") for m in msgs
    )
    assert any(m.startswith(f"{old} is the previous store of {out}") for m in msgs)
    assert any(m.startswith(f"{running} is an unfinished build") for m in msgs)
    assert any(m.startswith(f"{unmarked} is an unfinished build") for m in msgs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["s.zarr", running.name, unmarked.name, old.name, other.name]
    )
    assert not list(out.glob("mva_build_owner.json"))  # a finished store carries no owner mark
