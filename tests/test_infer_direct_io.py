"""trainer/jobs/direct_io.py on real Zarr arrays on disk: the raw O_DIRECT chunk writer and the O_DIRECT
store write the same bytes zarr writes itself (chunk files compared byte for byte), fall back to zarr
where the layout or the block does not allow the raw path, and fall back to ordinary writes where the
file system refuses O_DIRECT.

    .venv/bin/python -m pytest tests/test_infer_direct_io.py -q
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from trainer.jobs import direct_io
from trainer.jobs.common import output_compressors
from trainer.jobs.direct_io import DIRECT_MIN_BYTES, DirectLocalStore, RawChunkWriter

ROWS, COLS = 64, 256
SHAPE = (3 * ROWS - 10, 700)  # the last row block is short; the last column chunk is partial (700 = 2*256 + 188)


def _chunk_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and "/c/" in str(p)}


def _values(dtype) -> np.ndarray:
    rng = np.random.default_rng(0)
    v = rng.random(SHAPE, dtype=np.float32)
    return np.rint(v * 255).astype(np.uint8) if dtype == np.uint8 else v


def _pair(tmp_path: Path, dtype, fill, compressors=None):
    """The same array twice: one written through ``RawChunkWriter`` on a DirectLocalStore, one by zarr."""
    arrays = []
    for name, store in (("ours", DirectLocalStore(tmp_path / "ours.zarr")), ("zarr", str(tmp_path / "zarr.zarr"))):
        g = zarr.open_group(store, mode="w")
        arrays.append(g.create_array("X", shape=SHAPE, dtype=dtype, chunks=(ROWS, COLS), fill_value=fill,
                                     compressors=compressors))
    return arrays


def _count_direct_opens(monkeypatch) -> list[int]:
    opened: list[int] = []
    real_open = os.open

    def spy(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            opened.append(flags)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(direct_io.os, "open", spy)
    return opened


@pytest.mark.parametrize("dtype,fill", [(np.float32, np.nan), (np.uint8, 0)])
def test_raw_writer_writes_the_chunk_files_zarr_writes(tmp_path, monkeypatch, dtype, fill):
    monkeypatch.setattr(direct_io, "_direct_ok", True)
    opened = _count_direct_opens(monkeypatch)
    values = _values(dtype)
    ours, ref = _pair(tmp_path, dtype, fill)
    writer = RawChunkWriter(ours)
    assert writer.raw
    for lo in range(0, SHAPE[0], ROWS):
        hi = min(lo + ROWS, SHAPE[0])
        writer.write(lo, hi, values[lo:hi])  # the last, short block goes through zarr
        ref[lo:hi] = values[lo:hi]
    got, want = _chunk_files(tmp_path / "ours.zarr"), _chunk_files(tmp_path / "zarr.zarr")
    assert len(want) == 3 * 3 and got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours.zarr/X"), mode="r")[...], values)
    # the two whole row blocks x 3 column chunks went to disk past the page cache (ext4 here)
    if direct_io._direct_ok:
        assert len(opened) == 2 * 3
    assert not list((tmp_path / "ours.zarr").rglob("*.partial"))  # no temporary file left behind


def test_other_layouts_and_blocks_go_through_zarr(tmp_path):
    values = _values(np.float32)
    ours, _ = _pair(tmp_path, np.float32, np.nan, compressors=output_compressors())
    writer = RawChunkWriter(ours)
    assert not writer.raw  # compressed chunks are not the raw bytes
    writer.write(0, ROWS, values[:ROWS])
    np.testing.assert_array_equal(ours[:ROWS], values[:ROWS])
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array(
        "X", shape=SHAPE, dtype=np.float32, chunks=(ROWS, COLS), compressors=None)
    writer = RawChunkWriter(plain)
    assert writer.raw
    writer.write(10, 10 + ROWS, values[10:10 + ROWS])  # not chunk-aligned: zarr's read-modify-write
    writer.write(ROWS, 2 * ROWS, values[ROWS:2 * ROWS].astype(np.float64))  # other dtype: zarr casts
    np.testing.assert_array_equal(plain[10:2 * ROWS], values[10:2 * ROWS])
    assert not RawChunkWriter(plain, direct=False).raw


def test_store_writes_big_values_with_o_direct_and_small_ones_through_zarr(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "_direct_ok", True)
    opened = _count_direct_opens(monkeypatch)
    rows = DIRECT_MIN_BYTES // (4 * 100) + 1  # one chunk of rows x 100 float32 is just over the threshold
    values = np.random.default_rng(1).random((rows, 100), dtype=np.float32)
    arrays = []
    for store in (DirectLocalStore(tmp_path / "d.zarr"), str(tmp_path / "z.zarr")):
        g = zarr.open_group(store, mode="w")
        big = g.create_array("big", shape=values.shape, dtype=np.float32, chunks=values.shape, compressors=None)
        small = g.create_array("small", shape=(rows, 100), dtype=np.float32, chunks=(rows // 4, 100),
                               compressors=output_compressors())
        big[...] = values
        small[...] = values
        arrays.append((big, small))
    assert _chunk_files(tmp_path / "d.zarr") == _chunk_files(tmp_path / "z.zarr")
    np.testing.assert_array_equal(arrays[0][0][...], values)
    np.testing.assert_array_equal(arrays[0][1][...], values)
    if direct_io._direct_ok:
        assert len(opened) == 1  # the big chunk only; the small compressed chunks and metadata did not


def test_a_file_system_that_refuses_o_direct_gets_ordinary_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "_direct_ok", True)
    real_open = os.open

    def refuse(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))  # what tmpfs answers
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(direct_io.os, "open", refuse)
    values = _values(np.float32)
    ours, ref = _pair(tmp_path, np.float32, np.nan)
    writer = RawChunkWriter(ours)
    for lo in range(0, SHAPE[0], ROWS):
        hi = min(lo + ROWS, SHAPE[0])
        writer.write(lo, hi, values[lo:hi])
        ref[lo:hi] = values[lo:hi]
    assert direct_io._direct_ok is False
    assert _chunk_files(tmp_path / "ours.zarr") == _chunk_files(tmp_path / "zarr.zarr")
    assert not list((tmp_path / "ours.zarr").rglob("*.partial"))
