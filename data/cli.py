"""The error contract of every command-line entry point (mva-synth, mva-build, mva-train, mva-infer):
bad input ends in ONE line ``<prog>: error: <message>`` on stderr and exit status 2, not a traceback.
Only the errors an entry point names are caught: anything else is a bug and keeps its traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def one_line_errors(prog: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    try:
        yield
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
