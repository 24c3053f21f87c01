"""What a killed build leaves next to its output, and whether it may be removed.

The writer builds ``<out>.tmp-<id>`` and renames it into place (data/writer.py); a build that gets
SIGKILL (the OOM killer, a job's time limit) leaves that directory behind, with preshuffle's spill files
a full copy of the input. It was never removed and never mentioned. Every build therefore marks its
temporary directory with its host, pid and the pid's start time (``mva_build_owner.json``), and the next
build to the same output removes such a directory only when that proves it stale: same host, and no
process with that pid and start time runs any more. Anything else (a build still running, another host,
no marker, an ``<out>.old-<id>`` store moved aside by an overwrite killed between its two renames) is
reported by name, never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
from pathlib import Path

OWNER = "mva_build_owner.json"


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux /proc, clock ticks since boot); None when none runs or
    there is no /proc to ask."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def claim(tmp: Path) -> None:
    """Mark the temporary directory ``tmp`` as this process's build."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}
    (Path(tmp) / OWNER).write_text(json.dumps(me))


def release(tmp: Path) -> None:
    """Drop the mark before the store's file list is written: a finished store carries no owner."""
    (Path(tmp) / OWNER).unlink(missing_ok=True)


def _stale(d: Path) -> str | None:
    """Why ``d`` is provably left by a build that no longer runs, or None if that cannot be proven."""
    try:
        owner = json.loads((d / OWNER).read_text())
        host, pid, start = owner["host"], int(owner["pid"]), owner["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname() or start is None or _start_time(os.getpid()) is None:
        return None
    if _start_time(pid) == start:
        return None  # that build is still running (into the same output)
    return f"left by build process {pid} on this host, which no longer runs"


def clean(out: Path) -> None:
    """Remove the provably stale temporary builds of ``out``; warn about every other leftover by name."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for d in sorted(out.parent.iterdir()):
        if d.name.startswith(f"{out.name}.tmp-") and d.is_dir():
            why = _stale(d)
            if why is not None:
                shutil.rmtree(d, ignore_errors=True)
                warnings.warn(f"removed {d}: an unfinished build of {out} {why}", stacklevel=3)
            else:
                warnings.warn(f"{d} is an unfinished build of {out} (still running, killed on another host, or "
                              "from a version without owner marks); remove it by hand once no build writes there",
                              stacklevel=3)
        elif d.name.startswith(f"{out.name}.old-") and d.is_dir():
            warnings.warn(f"{d} is the previous store of {out}, moved aside by an overwrite that was interrupted "
                          "before it removed it; remove it (or move it back) by hand", stacklevel=3)
