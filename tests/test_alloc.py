"""trainer.alloc: after ``reuse_large_allocations()`` the 40 MB temporaries of a repeated step-like
pattern mostly reuse freed heap memory, while by default glibc maps and faults every one in again.

Each case runs in a fresh interpreter (the allocator setting is per process and sticky).
Run: ``.venv/bin/python -m pytest tests/test_alloc.py -q``
"""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from trainer.alloc import reuse_large_allocations
ok = reuse_large_allocations() if sys.argv[1] == "tuned" else True
faults = 0
for i in range(12):  # a step-like pattern: three 40 MB temporaries, freed at the end of the "step"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(10_000_000)
    a.fill_(1.0)
    b = a * 2
    c = b + a
    del a, b, c
    if i >= 6:  # after warm-up (the heap reaches its high-water mark within a few steps)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(ok, faults // 6)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_process_reuses_freed_large_blocks():
    ok, tuned = _faults("tuned")
    assert ok, "mallopt refused the thresholds"
    _, default = _faults("default")
    pages = 40_000_000 // 4096  # of one temporary
    assert default > 2.5 * pages, f"expected the default allocator to fault fresh mappings in ({default})"
    assert tuned < default / 2, f"tuned: {tuned} page faults per step vs {default} by default"
