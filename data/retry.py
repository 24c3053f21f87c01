"""Retried store reads, counted, with a clear error when a read keeps failing; and read-fault injection.

Two layers, because of how the fast path reads (checked, not assumed):

* **Slice level** (``read_slice``), always on. The loader reads ``array[a:b]`` through zarr's async API
  (``data/reader.py``). With the ``zarrs`` codec pipeline (the default, 2-10x faster here) the Rust
  side opens and reads the shard files itself: no Python ``Store`` method is called for chunk bytes,
  so a store wrapper would never see those reads. A failed slice read (OSError, or zarrs' RuntimeError
  for short/failed reads) is retried with exponential backoff; after the last attempt it raises
  :class:`StoreReadError` naming the array and the rows, e.g. a truncated or corrupted chunk (``data.store.StoreReadError``, a ``StoreError``, so
  every CLI reports it in one line).
* **Store level** (``RetryingStore``, a ``zarr.storage.WrapperStore``): retries ``get`` /
  ``get_partial_values`` on OSError. zarr opens a wrapped store with its Python codec pipeline (zarrs
  only drives LocalStore/fsspec stores itself; here ~7x slower on slice reads), so it is used only when
  asked: fault injection (``MVA_INJECT_READ_ERRORS``) or ``MVA_READ_RETRY_STORE=1`` (stores whose I/O
  goes through Python, e.g. a remote filesystem mounted through fsspec).

Settings (environment, so DataLoader workers and torchrun ranks inherit them):
``MVA_READ_RETRIES`` (default 4 attempts after the first), ``MVA_READ_BACKOFF_S`` (default 0.05, doubled
per attempt), ``MVA_INJECT_READ_ERRORS=<rate>:<seed>[:<key substring>]`` (each chunk read of the
wrapped store, optionally only keys containing the substring, fails with a transient ``OSError(EIO)``
with probability ``rate``; test use). Counters: :data:`STATS`.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import math
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zarr.storage import LocalStore, WrapperStore

INJECT_ENV = "MVA_INJECT_READ_ERRORS"
RETRIES_ENV = "MVA_READ_RETRIES"
BACKOFF_ENV = "MVA_READ_BACKOFF_S"
STORE_ENV = "MVA_READ_RETRY_STORE"
_METADATA = frozenset({"zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata"})


@dataclass
class ReadStats:
    """Process-wide counters (reported by the trainer in its metrics and result.json)."""

    retries: int = 0  # failed attempts that were retried
    injected: int = 0  # faults injected by MVA_INJECT_READ_ERRORS
    failures: int = 0  # reads given up after the last retry

    def as_dict(self) -> dict[str, int]:
        return {"read_retries": self.retries, "read_errors_injected": self.injected, "read_failures": self.failures}


STATS = ReadStats()
_lock = threading.Lock()


def _count(field: str) -> None:
    with _lock:
        setattr(STATS, field, getattr(STATS, field) + 1)


def take_stats() -> list[int]:
    """[retries, injected, failures] since the last call, reset: a DataLoader worker ships them with its batches
    (its counters live in its own process, and the trainer reports the run's)."""
    with _lock:
        out = [STATS.retries, STATS.injected, STATS.failures]
        STATS.retries = STATS.injected = STATS.failures = 0
    return out


def add_stats(counts) -> None:
    """Add a worker's ``take_stats()`` to this process's counters."""
    retries, injected, failures = (int(c) for c in counts)
    with _lock:
        STATS.retries += retries
        STATS.injected += injected
        STATS.failures += failures


def count_retry() -> None:
    """One failed attempt that a caller retries in its own way (e.g. a batched read falling back)."""
    _count("retries")


def _env_number(name: str, default: str, kind: type):
    """A non-negative number from the environment; a clear error naming the variable otherwise (a
    negative count skipped every read attempt and ended in an internal 'unreachable' error)."""
    text = os.environ.get(name, default).strip()
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if not math.isfinite(value):  # inf passed ">= 0", and the first transient error then slept forever
        raise ValueError(f"{name}={text!r} must be a finite number >= 0")
    if value < 0:
        raise ValueError(f"{name}={text!r} must be >= 0")
    return value


def retries() -> int:
    return _env_number(RETRIES_ENV, "4", int)


def backoff_s() -> float:
    return _env_number(BACKOFF_ENV, "0.05", float)


def injection() -> tuple[float, int, str] | None:
    """(rate, seed, key filter) from ``MVA_INJECT_READ_ERRORS=<rate>:<seed>[:<key substring>]``."""
    spec = os.environ.get(INJECT_ENV, "").strip()
    if not spec:
        return None
    try:
        rate, _, rest = spec.partition(":")
        seed, _, only = rest.partition(":")
        out = float(rate), int(seed or 0), only
    except ValueError:
        raise ValueError(f"{INJECT_ENV} must be <rate>:<seed>[:<key substring>], e.g. 0.05:0, got {spec!r}") from None
    if not 0.0 <= out[0] < 1.0:
        raise ValueError(f"{INJECT_ENV} rate must be in [0, 1), got {out[0]}")
    return out


# Set while a read_slice attempt runs: a RetryingStore underneath that gives up is then not a lost read
# (read_slice retries the whole range), so only the outermost layer counts a failure. asyncio tasks
# that zarr spawns for the attempt copy the context, so they see the flag.
_IN_READ_SLICE: contextvars.ContextVar[bool] = contextvars.ContextVar("mva_in_read_slice", default=False)


async def read_slice(arr, a: int, b: int):
    """``arr[a:b]`` through zarr's async API, retried; StoreReadError naming the array at the end."""
    n = retries()
    for attempt in range(n + 1):
        token = _IN_READ_SLICE.set(True)
        try:
            return await arr._async_array.getitem(slice(a, b))
        # zarrs reports its I/O and decode failures as RuntimeError; zarr's Python pipeline reports a
        # damaged shard index (crc32c mismatch) as ValueError
        except (OSError, RuntimeError, ValueError) as exc:
            if attempt == n:
                from data.store import StoreReadError  # data.store imports this module

                _count("failures")
                raise StoreReadError(f"cannot read {describe(arr)} rows [{a}, {b}) after {n + 1} attempts: "
                                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r} "
                                     f"(a truncated or corrupted chunk, or a lost file: rebuild or restore the "
                                     f"store)") from None
            _count("retries")
            await asyncio.sleep(backoff_s() * 2**attempt)
        finally:
            try:
                _IN_READ_SLICE.reset(token)
            except ValueError:  # closed outside its task (a read-ahead round still pending at exit): the
                pass  # task's context is gone with it, and the traceback was printed once per pending read
    raise AssertionError("unreachable")


def read_array(arr, a: int | None = None, b: int | None = None):
    """Synchronous :func:`read_slice` (whole array by default) for the non-hot-path reads."""
    from zarr.core.sync import sync

    return sync(read_slice(arr, 0 if a is None else a, arr.shape[0] if b is None else b))


def describe(arr) -> str:
    """The array's location for messages: ``<store>/shards/00003/mod/atac/X/data``."""
    root = getattr(arr.store, "root", None) or getattr(getattr(arr.store, "_store", None), "root", None)
    return f"{root}/{arr.path}" if root is not None else f"array {arr.path!r}"


class RetryingStore(WrapperStore):
    """A read-only store whose reads are retried on OSError (and optionally fail on purpose)."""

    def __init__(self, store, inject: tuple[float, int, str] | None = None):
        super().__init__(store)
        self._inject = inject
        self._rng = random.Random(inject[1]) if inject else None

    @property
    def root(self) -> Path | None:
        return getattr(self._store, "root", None)

    def _with_store(self, store):
        return type(self)(store, self._inject)

    def _maybe_fail(self, key: str) -> None:
        # only chunk bytes (metadata is read once at open; failing it tests nothing new)
        if (self._rng is not None and key.rsplit("/", 1)[-1] not in _METADATA and self._inject[2] in key
                and self._rng.random() < self._inject[0]):
            _count("injected")
            raise OSError(errno.EIO, f"injected transient read error ({INJECT_ENV})", key)

    async def _retry(self, key: str, call):
        n = retries()
        for attempt in range(n + 1):
            try:
                self._maybe_fail(key)
                return await call()
            except OSError:
                if attempt == n:
                    if not _IN_READ_SLICE.get():  # else read_slice retries the range and counts the outcome
                        _count("failures")
                    raise
                _count("retries")
                await asyncio.sleep(backoff_s() * 2**attempt)
        raise AssertionError("unreachable")

    async def get(self, key: str, prototype, byte_range=None):
        return await self._retry(key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges) -> list[Any]:
        key_ranges = list(key_ranges)
        first = key_ranges[0][0] if key_ranges else ""
        return await self._retry(first, lambda: self._store.get_partial_values(prototype, key_ranges))


def store_for(path: str | os.PathLike):
    """What ``zarr.open_group`` should open: the plain path (zarrs fast path, slice-level retries) or a
    :class:`RetryingStore` when injection or store-level retries are asked for."""
    inject = injection()
    if inject is None and os.environ.get(STORE_ENV, "") in ("", "0", "false"):
        return str(path)
    return RetryingStore(LocalStore(str(path), read_only=True), inject)


def reset_stats() -> None:
    with _lock:
        STATS.retries = STATS.injected = STATS.failures = 0

