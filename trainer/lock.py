"""An exclusive lock on a run or output directory, so two jobs never write into the same place.

    with locked(run_dir, "mva-train"):          # or: lock = acquire(run_dir, "mva-train"); lock.release()
        ...

The lock is a file ``<dir>/.mva.lock`` holding JSON (host, pid, process start time, boot id, command,
what, time). It appears atomically and complete: the record is written to a private temporary file
which is then hard-linked to the lock name; ``link`` fails with EEXIST if another job holds it, so
there is no window in which a reader sees an empty or half-written lock.

A job killed with SIGKILL cannot remove its lock. Such a *stale* lock is detected, never silently
taken over: the holder is on this host, in this PID namespace, and its pid is gone (or is a zombie, or
belongs to a newer process: the pid was reused, detected by comparing the kernel's process start time; or
the machine rebooted, detected by the boot id; a host of the same name with another machine id cannot be
checked), or it ran in another PID namespace of this kernel (a container with the host's name, whose pid
means nothing here) and its lock has gone untouched for SILENT_S (a holder touches it every HEARTBEAT_S),
or it was written by an earlier attempt of the same Slurm job, now requeued (``SLURM_JOB_ID`` equal,
``SLURM_RESTART_COUNT`` lower: on any host, as the requeued job's rank 0 may run on another node). A stale lock is reported with how to clear it:

* ``clear_stale=True`` or the env var ``MVA_CLEAR_STALE_LOCK=1`` removes a stale lock (printing one
  line naming the dead holder) and takes it. Training does this by default (``run.clear_stale_lock``,
  default true) because resuming after a crash (SLURM requeue, ``torchrun --max-restarts``) is the
  normal way to continue a run, and a holder proven dead cannot be writing; ``run.clear_stale_lock=false``
  makes a stale lock stop the run instead. The library default is to refuse;
* ``python -m trainer.lock clear <dir>`` removes a stale lock by hand (``--force`` also removes a lock
  whose holder cannot be checked: another host, which only the user can know is dead).

A lock held by a live process is never removed by any of these, except ``--force``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

LOCK_NAME = ".mva.lock"
CLEAR_ENV = "MVA_CLEAR_STALE_LOCK"
# A holder touches its lock every HEARTBEAT_S; a lock from another PID namespace of this kernel (whose pid we
# cannot look up) untouched for SILENT_S is its dead holder's: a container restarted after an OOM kill gets a
# new namespace and must still resume its run, while a live job in a sibling container is never taken over.
HEARTBEAT_S = 30.0
SILENT_S = 600.0


class LockError(RuntimeError):
    """The directory is locked by another job (live, stale, or on another host)."""


@dataclass
class Lock:
    path: Path
    record: dict[str, Any]
    released: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)

    def start_heartbeat(self) -> None:
        threading.Thread(target=_heartbeat, args=(self.path, self.record["token"], self._stop), daemon=True,
                         name="mva-lock-heartbeat").start()

    def release(self) -> None:
        """Remove the lock file if it is still ours (never someone else's that replaced a cleared one)."""
        self._stop.set()
        if self.released:
            return
        self.released = True
        holder = read_holder(self.path.parent)
        if holder is not None and holder.get("token") == self.record["token"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _heartbeat(path: Path, token: str, stop: threading.Event) -> None:
    """Touch the lock every HEARTBEAT_S while it is ours (a thread of the holder; stops with ``release``)."""
    while not stop.wait(HEARTBEAT_S):
        holder = read_holder(path.parent)
        if holder is None or holder.get("token") != token:
            return  # cleared by hand (--force) and maybe taken by another job: not ours to touch
        try:
            os.utime(path)
        except OSError:
            pass  # a full or read-only disk: the job itself will say so


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (clock ticks since boot; field 22 of /proc/<pid>/stat), None if gone.

    Together with the boot id it identifies a process uniquely, so a recycled pid is not mistaken for
    the job that wrote the lock."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces: split after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # zombie: killed, waiting to be reaped; it holds nothing
        return None
    return int(fields[19])


def _pid_namespace() -> str:
    """This process's PID namespace ('pid:[4026531836]'; '' where /proc does not say): a container that shares
    the host's name and kernel (hostNetwork, Apptainer) sees the host's pids as other processes or none."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _machine_id() -> str:
    """The installation's id (/etc/machine-id, kept across reboots; '' where absent): tells a reboot of this
    machine from another machine that has the same host name."""
    try:
        return Path("/etc/machine-id").read_text().strip()
    except OSError:
        return ""


def _slurm_attempt() -> tuple[str, int]:
    """(Slurm job id, requeue count) of this process; ("", 0) outside Slurm."""
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        restarts = 0
    return os.environ.get("SLURM_JOB_ID", ""), restarts


def _record(what: str) -> dict[str, Any]:
    pid = os.getpid()
    job, restarts = _slurm_attempt()
    return {"what": what, "host": socket.gethostname(), "pid": pid, "start_time": process_start_time(pid),
            "boot_id": _boot_id(), "machine_id": _machine_id(), "pid_ns": _pid_namespace(),
            "command": " ".join(sys.argv)[:500],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex,
            "slurm_job": job, "slurm_restart": restarts}


def read_holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The lock record of ``directory`` (None if unlocked). An unreadable record is returned as
    ``{"unreadable": reason}`` so callers report it instead of crashing."""
    path = Path(directory) / LOCK_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(text)
        age = max(0.0, time.time() - path.stat().st_mtime)
    except ValueError as exc:
        return {"unreadable": f"{exc}"}
    except FileNotFoundError:
        return None
    # ``_age_s``: seconds since the holder last touched it (not part of the file)
    return {**rec, "_age_s": age} if isinstance(rec, dict) else {"unreadable": "not a JSON object"}


def stale_reason(holder: dict[str, Any]) -> str | None:
    """Why the holder is certainly dead (a string), or None if it is alive or cannot be checked."""
    if "unreadable" in holder:
        return None
    job, restarts = _slurm_attempt()
    if job and holder.get("slurm_job") == job and restarts > int(holder.get("slurm_restart") or 0):
        # Slurm ends a job with SIGTERM (no finally runs) and starts a requeued one only after every process
        # of the earlier attempt is gone; the new rank 0 may be on another node, whose processes we cannot see
        return f"Slurm job {job} was requeued since (attempt {restarts}; the lock is attempt {holder.get('slurm_restart') or 0}'s)"
    if holder.get("host") != socket.gethostname():
        return None  # another machine: we cannot see its processes
    if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        # another kernel: this machine rebooted, or another machine with the same host name (told apart by the
        # machine id where both record one; the same boot id is one running kernel whatever the machine id says)
        if holder.get("machine_id") and _machine_id() and holder["machine_id"] != _machine_id():
            return None
        return "the machine has rebooted since"
    if holder.get("pid_ns") and _pid_namespace() and holder["pid_ns"] != _pid_namespace():
        # another PID namespace on this kernel (a container with the host's name): its pid means another process
        # here, or none (a live job was taken for dead and its run directory shared by two jobs); only silence
        # tells, as a live holder touches its lock every HEARTBEAT_S
        age = holder.get("_age_s")
        if age is not None and age > SILENT_S:
            return (f"it ran in another PID namespace (a container) and has not touched its lock for {age:.0f} s "
                    f"(a live holder does every {HEARTBEAT_S:.0f} s)")
        return None
    pid = int(holder.get("pid", -1))
    now = process_start_time(pid) if pid > 0 else None
    if now is None:
        return f"process {pid} is no longer running"
    if holder.get("start_time") is not None and now != int(holder["start_time"]):
        return f"pid {pid} now belongs to another process (start time differs)"
    return None


def describe(holder: dict[str, Any]) -> str:
    if "unreadable" in holder:
        return f"an unreadable lock record ({holder['unreadable']})"
    return (f"{holder.get('what', '?')} (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {holder.get('created')}, command: {holder.get('command')})")


def _try_link(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock file atomically with its full content; False if it already exists."""
    tmp = path.with_name(f"{LOCK_NAME}.{record['token']}.tmp")
    with open(tmp, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # a filesystem without hard links: fall back to O_EXCL creation (a reader may briefly see
        # an empty file, which read_holder reports as unreadable, never as stale)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def acquire(directory: str | os.PathLike, what: str, *, clear_stale: bool = False) -> Lock:
    """Lock ``directory`` (created if missing) for this process, or raise :class:`LockError`
    naming the holder (and, for a stale lock, how to clear it)."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LockError(f"cannot create directory {d} for the lock: {exc.strerror or exc}") from None
    path = d / LOCK_NAME
    clear_stale = clear_stale or os.environ.get(CLEAR_ENV, "") not in ("", "0", "false")
    record = _record(what)
    for _ in range(3):  # a cleared stale lock may be re-taken by a racing job; retry a few times
        try:
            if _try_link(path, record):
                lock = Lock(path=path, record=record)
                lock.start_heartbeat()
                return lock
        except OSError as exc:
            raise LockError(f"cannot write the lock file in {d}: {exc.strerror or exc}") from None
        holder = read_holder(d)
        if holder is None:
            continue  # released between our attempt and the read
        reason = stale_reason(holder)
        if reason is None:
            raise LockError(f"{d} is in use by {describe(holder)}; wait for it to finish or use another "
                            f"directory (if you are sure it is dead: python -m trainer.lock clear --force {d})")
        if not clear_stale:
            raise LockError(f"{d} has a stale lock from {describe(holder)}: {reason}. Clear it with "
                            f"{CLEAR_ENV}=1 or "
                            f"`python -m trainer.lock clear {d}`")
        clear(d, expected_token=holder.get("token"))
        print(f"[lock] cleared a stale lock on {d} from {describe(holder)}: {reason}", file=sys.stderr,
              flush=True)
    raise LockError(f"{d}: could not take the lock after clearing a stale one (another job raced for it)")


def clear(directory: str | os.PathLike, *, force: bool = False, expected_token: str | None = None) -> str:
    """Remove the lock of ``directory`` if its holder is dead (or ``force``). Returns what was done."""
    d = Path(directory)
    holder = read_holder(d)
    if holder is None:
        return f"{d} is not locked"
    reason = stale_reason(holder)
    if reason is None and not force:
        raise LockError(f"{d} is locked by {describe(holder)}, which is alive or cannot be checked; "
                        f"refusing to clear it (add --force if you are sure it is dead)")
    if expected_token is not None and holder.get("token") != expected_token:
        return f"{d}: the lock changed hands meanwhile; left alone"
    # Rename first, then check WHAT was renamed: between reading the record above and the rename, another
    # job may have cleared the same stale lock and taken a fresh one; renaming that away would leave two
    # live holders. A lock that is not the one judged stale is linked back (os.link fails if the name
    # was taken again meanwhile: then the newer holder keeps it).
    grave = d / f"{LOCK_NAME}.{uuid.uuid4().hex}.cleared"
    try:
        os.rename(d / LOCK_NAME, grave)
    except FileNotFoundError:
        return f"{d} is not locked"
    try:
        moved = json.loads(grave.read_text())
    except (OSError, ValueError):
        moved = {}
    if not isinstance(moved, dict) or moved.get("token") != holder.get("token"):
        try:
            os.link(grave, d / LOCK_NAME)
        except FileExistsError:
            pass
        grave.unlink(missing_ok=True)
        return f"{d}: the lock changed hands meanwhile; left alone"
    grave.unlink(missing_ok=True)
    return f"cleared the lock of {d} ({describe(holder)}; {reason or 'forced'})"


@contextmanager
def locked(directory: str | os.PathLike, what: str, *, clear_stale: bool = False) -> Iterator[Lock]:
    lock = acquire(directory, what, clear_stale=clear_stale)
    try:
        yield lock
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.lock status|clear [--force] DIR``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m trainer.lock", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("status", "clear"))
    p.add_argument("directory")
    p.add_argument("--force", action="store_true", help="clear even a lock whose holder looks alive")
    a = p.parse_args(argv)
    try:
        if a.action == "status":
            holder = read_holder(a.directory)
            if holder is None:
                print(f"{a.directory} is not locked")
            else:
                reason = stale_reason(holder)
                print(f"{a.directory} locked by {describe(holder)}" + (f" [STALE: {reason}]" if reason else ""))
        else:
            print(clear(a.directory, force=a.force))
    except LockError as exc:
        print(f"trainer.lock: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
