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
from data.store_format import StoreSchema
from data.writer import StoreWriter
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


def _sorted_store(path):
    """3 shards of 100 cells: shard 0 all batch 'a' (codes all 0), shard 2 without ATAC (mask_atac and
    lib_atac all zero): chunk files zarr legitimately never writes. No manifest (built before it)."""
    import pandas as pd
    import scipy.sparse as sp

    from data.manifest import MANIFEST
    from data.store_format import StoreSchema
    from data.writer import StoreWriter

    n = 300
    rna = sp.random(n, 20, density=0.3, format="csr", random_state=0)
    rna.data = np.ceil(rna.data * 5)
    has_atac = np.arange(n) < 200
    atac = sp.random(n, 30, density=0.3, format="csr", random_state=1)
    atac.data = np.ceil(atac.data * 2)
    atac = sp.csr_matrix(sp.diags_array(has_atac.astype(float)) @ atac)
    atac.eliminate_zeros()
    obs = pd.DataFrame(
        {"batch": np.where(np.arange(n) < 150, "a", "b"), "mask_rna": True, "mask_atac": has_atac},
        index=[f"c{i}" for i in range(n)],
    )
    schema = StoreSchema(
        gene_names=[f"g{i}" for i in range(20)],
        region_names=[f"chr1:{i}0-{i}5" for i in range(30)],
        batch_categories=["a", "b"],
    )
    with StoreWriter(path, schema, shard_size=100) as w:
        w.append(rna.astype(np.int32), atac.astype(np.int32), obs)
    (path / MANIFEST).unlink()
    return path


@pytest.mark.parametrize(
    "lost", ["mask_atac", "batch/codes", "split_hash", "lib_rna", "cell_index", "_index", None]
)
def test_a_store_without_manifest_refuses_an_obs_chunk_whose_zeros_would_be_wrong(tmp_path, lost):
    # zarr reads a missing chunk file as zeros: a lost mask_atac chunk made ATAC-measured cells RNA-only, a lost
    # batch chunk moved cells to batch 0, a lost split_hash chunk put them all in validation, all silently
    import shutil

    from data.store import StoreReadError
    from data.stream import StoreStream

    p = _sorted_store(tmp_path / "s.zarr")
    assert not (p / "shards/00000/obs/batch/codes/c/0").exists()  # all batch a: never written
    assert not (p / "shards/00002/obs/mask_atac/c/0").exists()  # no ATAC: never written
    ok = [b["mask"].numpy() for b in StoreStream(p, 300, split="all", shuffle=False)]
    assert ok[0][:, 1].sum() == 200
    if lost is None:
        return
    bad = tmp_path / "bad.zarr"
    shutil.copytree(p, bad)
    (bad / f"shards/00001/obs/{lost}/c/0").unlink()
    where = f"{bad}/shards/00001/obs/{lost}/c/0"
    for read in (
        lambda: StoreStream(bad, 64, split="train"),
        lambda: StoreStream(bad, 64, split="all"),
        lambda: open_store(bad).read_obs(),
    ):
        with pytest.raises(StoreReadError, match=f"obs chunk files are missing .*{where}"):
            read()
