"""Stores whose files are not the build's: a store copied over an older one (stale chunk files the new build
never wrote), a store that lost a feature file (read at open, before any stream checks the manifest).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_store_edges.py -q -p no:cacheprovider
"""

from __future__ import annotations

import shutil

import pytest

from data.manifest import MANIFEST
from data.store import StoreReadError, open_store
from data.stream import StoreStream
from data.synthetic import write_synthetic_store

_KW = {"n_cells": 300, "n_genes": 30, "n_regions": 50, "shard_size": 100, "progress": False}


def test_a_store_copied_over_an_older_one_is_refused_not_read_with_the_old_ones_chunks(tmp_path):
    # `cp -r new/. old/` or `rsync -a new/ old/` (no --delete) keeps the old store's files that the new build did
    # not write; zarr writes no file for an all-zero chunk, so where the new store has one (no ATAC cell: masks,
    # libraries and indptr all zero) the old file was read instead: 223 of 300 RNA-only cells came back as
    # ATAC-measured, and the manifest check passed (every listed file is there at its size)
    old = write_synthetic_store(tmp_path / "s.zarr", **_KW)
    new = write_synthetic_store(tmp_path / "new.zarr", paired_fraction=0.0, rna_only_fraction=1.0,
                                atac_only_fraction=0.0, seed=3, **_KW)
    assert not (new / "shards/00000/obs/mask_atac/c/0").exists()  # all False: never written
    shutil.copytree(new, old, dirs_exist_ok=True)
    with pytest.raises(StoreReadError, match=r"not written by this build.*shards/00000/mod/atac/X/indptr/c/0"):
        open_store(old).read_obs()
    with pytest.raises(StoreReadError, match="not written by this build"):
        StoreStream(old, 64, split="all", shuffle=False)
    # the new store itself, and a copy of it, are fine; files that are not chunks (a desktop's .DS_Store) are too
    assert open_store(new).read_obs()["mask_atac"].sum() == 0
    (new / "shards/.DS_Store").write_bytes(b"x")
    assert open_store(new).verify_files()


@pytest.mark.parametrize("lost", ["features/rna/_index/c/0", "features/atac/start/c/0", "features/atac"])
def test_a_store_that_lost_a_feature_file_is_refused_at_open_naming_it(tmp_path, lost):
    # the feature tables are read by open_store, before any stream checks the manifest: a lost gene-name chunk read
    # as 30 empty names (mva-infer then said "30 of the model's genes missing"), a lost start chunk as positions 0,
    # and a lost features/atac group ended in a bare KeyError 'features/atac' (a traceback in every CLI)
    p = write_synthetic_store(tmp_path / "s.zarr", **_KW)
    bad = tmp_path / "bad.zarr"
    shutil.copytree(p, bad)
    target = bad / lost
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(StoreReadError, match=rf"missing, e\.g\. \['{lost}"):
        open_store(bad)


def test_a_store_without_manifest_that_lost_its_feature_names_is_refused_at_open(tmp_path):
    # no manifest (built before it): the names of a lost chunk read as "" and repeat, which no build writes
    p = write_synthetic_store(tmp_path / "s.zarr", **_KW)
    (p / MANIFEST).unlink()
    assert open_store(p).meta.gene_names[:2] == ["gene_00000", "gene_00001"]
    no_group = tmp_path / "no_group.zarr"
    shutil.copytree(p, no_group)
    (p / "features/rna/_index/c/0").unlink()
    with pytest.raises(StoreReadError, match=r"features/rna: feature names repeat \(e\.g\. ''\)"):
        open_store(p)
    shutil.rmtree(no_group / "features/atac")
    with pytest.raises(StoreReadError, match=r"features/atac cannot be read \(KeyError"):
        open_store(no_group)
