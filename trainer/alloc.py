"""Keep large freed blocks in the process heap during training (glibc ``mallopt``), so the big per-step
temporaries do not page-fault every step.

torch's CPU tensors come from ``malloc``. glibc serves blocks above ``M_MMAP_THRESHOLD`` with a fresh
``mmap`` and unmaps them on free; the threshold adapts upwards to at most 32 MiB on 64-bit, so every
temporary above that size (a 1,024 x 10,000 float32 ATAC array is 41 MB, and a step makes ~15 of them)
is zero-filled page by page by the kernel on first touch, every step. Measured on the 2-core VM at
batch 1,024 (the model-step harness, one thread): 410 -> 272 ms per step with the threshold raised to
1 GiB; no change at batch 128 (its 5 MB arrays are under the adaptive threshold already).

The cost is that freed memory is kept for reuse (up to ``M_TRIM_THRESHOLD`` of free space at the top
of the heap) instead of being returned to the system, so RSS stays at the step's high-water mark. Only
the training entry point calls this; it is a no-op where glibc's ``mallopt`` is unavailable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused after free
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap top is returned to the system beyond 2 GiB (int max)


def reuse_large_allocations() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if both were accepted."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
