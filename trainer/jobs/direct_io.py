"""Writing big output chunks past the page cache (``O_DIRECT``), and without zarr's per-chunk copies.

Why: a float32 accessibility output is 40 KB per cell (2 GB for 50,000 cells x 10,000 regions).
Written the ordinary way, the kernel copies every byte into freshly allocated page-cache pages and that
copy is charged to the job as system time: measured on the 2-core VM (200 files of 8 MiB, 1.6 GB),
1.5-3.5 s of system CPU and 7-10 s wall, i.e. 30-70 us of CPU per cell, as much as encoding and
decoding the cell. The same bytes written with ``O_DIRECT`` cost 0.1-0.16 s of system CPU and 0.9-1.3 s
wall (the virtio disk DMAs them; no page-cache copy, no later writeback). The output is then not in the
page cache: the first read of it comes from the disk.

Two entry points, both writing the bytes zarr itself would write:

* ``DirectLocalStore``: a zarr ``LocalStore`` whose values of at least ``DIRECT_MIN_BYTES`` go to disk
  with O_DIRECT (compressed chunks, any array); smaller values (metadata, embed chunks, obs columns)
  take zarr's ordinary write.
* ``RawChunkWriter``: for an uncompressed 2-D array (codecs = the bytes codec alone, no sharding) a
  whole block of chunk rows is written by copying each chunk straight into a page-aligned buffer
  and writing that: one copy per byte instead of zarr's slice copy + encode + our aligned copy
  (measured, 1,024 x 10,000 float32 per block: 24-26 -> ~8 us of CPU per cell). Anything else
  (a compressed array, a block that is not whole chunk rows) goes through ``arr[lo:hi] = values``.

O_DIRECT needs aligned memory, offsets and lengths: the buffer is an anonymous mmap (page-aligned),
padded to whole 4 KiB blocks, truncated back to the real length after the write, and renamed into place
(atomic like zarr's own write). A file system that refuses O_DIRECT (``EINVAL``, e.g. an older tmpfs)
gets the same bytes written the ordinary way.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

# Below this the page-cache copy is cheap and the aligned copy + extra syscalls are not worth it.
DIRECT_MIN_BYTES = 1 << 20
# O_DIRECT alignment: 4096 covers every logical block size in use (512 and 4096 bytes).
ALIGN = 4096
# Aligned buffers are kept for reuse: a fresh anonymous mmap would page-fault on every write (the very
# cost this module avoids). zarr writes the chunks of one region from a few threads at once.
_KEEP_BUFFERS = 8


def _round_up(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


class _BufferPool:
    """Page-aligned (anonymous mmap) scratch buffers, reused across writes and threads."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        return mmap.mmap(-1, _round_up(size))

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < _KEEP_BUFFERS:
                self._free.append(buf)
        # else dropped: unmapped by the garbage collector once no view of it is left


_POOL = _BufferPool()
# False after a file system refused O_DIRECT once: later writes go the ordinary way at once.
_direct_ok = True


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def _try_direct(tmp: Path, view: memoryview, n: int) -> bool:
    """Write ``view`` (aligned, whole blocks) to a new file ``tmp`` with O_DIRECT and cut it to ``n``
    bytes; False (nothing left behind) if the file system refuses O_DIRECT."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    try:
        _write_all(fd, view)
        if len(view) != n:
            os.ftruncate(fd, n)
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        os.close(fd)
        fd = -1
        tmp.unlink(missing_ok=True)
        return False
    finally:
        if fd >= 0:
            os.close(fd)


def write_file(path: Path, nbytes: int, fill: Callable[[memoryview], None]) -> None:
    """Write a file of ``nbytes`` bytes whose content ``fill`` puts into the (writable, page-aligned)
    view it is given; O_DIRECT where the file system allows, atomically (temporary file + rename)."""
    global _direct_ok
    padded = _round_up(max(nbytes, 1))
    buf = _POOL.take(padded)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    view = memoryview(buf)
    try:
        fill(view[:nbytes])
        view[nbytes:padded] = bytes(padded - nbytes)  # padding: cut off again by the truncate
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (_direct_ok and _try_direct(tmp, view[:padded], nbytes)):
            _direct_ok = False
            with open(tmp, "wb") as f:
                f.write(view[:nbytes])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        view.release()
        _POOL.give(buf)


def _copy_bytes(data: memoryview) -> Callable[[memoryview], None]:
    def fill(view: memoryview) -> None:
        view[:] = data

    return fill


class DirectLocalStore(LocalStore):
    """``LocalStore`` whose large values go to disk with O_DIRECT (see the module docstring)."""

    def _put_direct(self, path: Path, value: Buffer) -> None:
        data = memoryview(value.as_buffer_like()).cast("B")
        write_file(path, data.nbytes, _copy_bytes(data))

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        if exclusive or len(value) < DIRECT_MIN_BYTES:
            return await super()._set(key, value, exclusive=exclusive)
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(self._put_direct, self.root / key, value)

    def set_sync(self, key: str, value: Buffer) -> None:
        if len(value) < DIRECT_MIN_BYTES:
            return super().set_sync(key, value)
        self._ensure_open_sync()
        self._check_writable()
        self._put_direct(self.root / key, value)


def raw_layout(arr: zarr.Array) -> bool:
    """True if a chunk of ``arr`` on disk is exactly its C-order little-endian bytes at full chunk
    shape (zarr format 3, the bytes codec alone, no sharding, a local store), so it can be written
    without zarr's codec pipeline."""
    meta = arr.metadata
    if getattr(meta, "zarr_format", None) != 3 or arr.ndim != 2 or arr.shards is not None:
        return False
    codecs = tuple(meta.codecs)
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return False
    dt = np.dtype(arr.dtype)
    if dt.itemsize > 1 and (codecs[0].endian is None or codecs[0].endian.value != "little"):
        return False
    return isinstance(arr.store, LocalStore) and getattr(meta, "order", "C") == "C"


class RawChunkWriter:
    """Writes row blocks of a 2-D Zarr array, one whole chunk row at a time, with O_DIRECT and one copy
    per byte where ``raw_layout`` allows (see the module docstring); otherwise through zarr."""

    def __init__(self, arr: zarr.Array, direct: bool = True):
        self.arr = arr
        self.raw = direct and raw_layout(arr)  # direct=False: always through zarr (A/B timing)
        self.rows, self.cols = arr.chunks
        self.dtype = np.dtype(arr.dtype)
        fill = arr.metadata.fill_value
        self.fill = np.asarray(0 if fill is None else fill, dtype=self.dtype)
        self.dir = Path(str(arr.store.root)) / arr.path if self.raw else None

    def write(self, lo: int, hi: int, values: np.ndarray) -> None:
        """``arr[lo:hi] = values``."""
        n_rows, n_cols = self.arr.shape
        whole = lo % self.rows == 0 and hi - lo == self.rows and hi <= n_rows
        if not (self.raw and whole and values.shape == (hi - lo, n_cols) and values.dtype == self.dtype):
            self.arr[lo:hi] = values
            return
        k = lo // self.rows
        chunk_bytes = self.rows * self.cols * self.dtype.itemsize
        for j, c0 in enumerate(range(0, n_cols, self.cols)):
            c1 = min(c0 + self.cols, n_cols)

            def fill(view: memoryview, c0: int = c0, c1: int = c1) -> None:
                dst = np.frombuffer(view, dtype=self.dtype).reshape(self.rows, self.cols)
                dst[:, : c1 - c0] = values[:, c0:c1]
                if c1 - c0 < self.cols:
                    dst[:, c1 - c0:] = self.fill  # the edge chunk is stored at full shape, as zarr does
            write_file(self.dir / self.arr.metadata.encode_chunk_key((k, j)), chunk_bytes, fill)
