"""The error contract of every command-line entry point (mva-synth, mva-build, mva-train, mva-infer):
bad input ends in ONE line ``<prog>: error: <message>`` on stderr and exit status 2, not a traceback.
Only the errors an entry point names are caught: anything else is a bug and keeps its traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def one_line_errors(prog: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    try:
        yield
    except errors as exc:
        # one write() of the whole line: torchrun starts ranks with `python -u` (stderr unbuffered), where print()
        # writes the message and its newline separately and two ranks' lines came out as one (CI, 2 ranks)
        line = f"{prog}: error: {exc}\n"
        sys.stderr.flush()  # what was written before stays before
        try:
            os.write(sys.stderr.fileno(), line.encode())
        except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor (captured in-process)
            sys.stderr.write(line)
            sys.stderr.flush()
        sys.exit(2)


def omp_threads(value: str | None) -> int:
    """Torch threads for ``OMP_NUM_THREADS`` as OpenMP reads it: the first level of a nested list ("2,1");
    1 (the CLIs' default) where it is empty or not a positive number (``int()`` of those crashed the CLIs)."""
    first = (value or "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else 1
