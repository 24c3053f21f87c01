"""Real small or read-only filesystems for disk-full and not-writable tests.

A size-limited tmpfs gives the kernel's own ENOSPC (no patched writer); a read-only tmpfs gives EROFS
even to root, for whom chmod does not stop writes. Mounting needs root (CAP_SYS_ADMIN): without it the
tests that need a mount are skipped with the reason, never faked.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(path: Path, size: str = "16m", *, read_only: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem of ``directory`` until at most ``leave_bytes`` are free; returns the filler."""
    filler = directory / "filler.bin"
    block = b"\0" * 65536
    with open(filler, "wb") as fh:
        while True:
            free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
            if free <= leave_bytes:
                break
            try:
                fh.write(block[:max(4096, min(len(block), free - leave_bytes))])
                fh.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
