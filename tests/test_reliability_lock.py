"""The run/output directory lock (trainer/lock.py): a second job is refused, a SIGKILLed holder's lock
is detected as stale, reported with how to clear it, cleared, and the rerun works.

    .venv/bin/python -m pytest tests/test_reliability_lock.py -q
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train_utils import PY, ROOT, as_cli, env, tiny_overrides, tiny_store
from trainer import lock as lk

HOLD = ("import sys, time; from trainer.lock import acquire; "
        "l = acquire(sys.argv[1], 'holder-job'); print('ready', flush=True); time.sleep(600)")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store", n_cells=400)


def _holder(directory: Path) -> subprocess.Popen:
    """A real other process holding the lock of ``directory``."""
    proc = subprocess.Popen([PY, "-c", HOLD, str(directory)], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _train(overrides: dict, *extra: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "trainer.train", *as_cli(overrides), *extra], cwd=ROOT,
                          env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow  # three mva-train processes, one of them killed
def test_a_second_job_is_refused_then_a_sigkilled_holder_is_stale_clearable_and_the_rerun_works(store, tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        # in-process: refused, naming the holder
        with pytest.raises(lk.LockError, match=rf"in use by holder-job .*pid {holder.pid}"):
            lk.acquire(run, "second")
        # the real CLI: one line, exit 2, and nothing written into the busy directory
        ov = tiny_overrides(store, run, **{"run.epochs": 1, "run.clear_stale_lock": False})
        r = _train(ov)
        assert r.returncode == 2, r.stderr[-2000:]
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("mva-train: error: ") and f"pid {holder.pid}" in err[0], r.stderr
        assert sorted(p.name for p in run.iterdir()) == [lk.LOCK_NAME]  # Hydra writes nothing there
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the dead holder's lock is still there: detected as stale, reported with how to clear it
    assert (run / lk.LOCK_NAME).is_file()
    with pytest.raises(lk.LockError, match=rf"stale lock .*process {holder.pid} is no longer running.*"
                                           rf"{lk.CLEAR_ENV}=1"):
        lk.acquire(run, "second")
    r = _train(ov)
    assert r.returncode == 2 and "stale lock" in r.stderr and "trainer.lock clear" in r.stderr, r.stderr[-2000:]
    st = subprocess.run([PY, "-m", "trainer.lock", "status", str(run)], cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=60, check=False)
    assert "STALE" in st.stdout and str(holder.pid) in st.stdout
    cl = subprocess.run([PY, "-m", "trainer.lock", "clear", str(run)], cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=60, check=False)
    assert cl.returncode == 0 and "cleared" in cl.stdout and not (run / lk.LOCK_NAME).exists()
    # rerun completes and releases its own lock
    r = _train(ov)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "model" / "model.safetensors").is_file() and not (run / lk.LOCK_NAME).exists()


def test_training_takes_over_a_proven_dead_lock_by_default_and_says_so(store, tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    r = _train(tiny_overrides(store, run, **{"run.epochs": 1}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"cleared a stale lock on {run}" in r.stderr and f"pid {holder.pid}" in r.stderr
    assert not (run / lk.LOCK_NAME).exists()


def test_pid_reuse_is_stale_but_a_live_holder_is_never_cleared(tmp_path):
    me = os.getpid()
    rec = lk._record("fake")
    (tmp_path / lk.LOCK_NAME).write_text(json.dumps(rec))  # this very process holds it: alive
    with pytest.raises(lk.LockError, match="in use by fake"):
        lk.acquire(tmp_path, "x", clear_stale=True)
    with pytest.raises(lk.LockError, match="refusing to clear"):
        lk.clear(tmp_path)
    # same pid, different start time: the pid was recycled by another process -> stale
    (tmp_path / lk.LOCK_NAME).write_text(json.dumps({**rec, "start_time": rec["start_time"] - 1}))
    assert "start time differs" in lk.stale_reason(lk.read_holder(tmp_path))
    assert lk.stale_reason({**rec, "pid": me}) is None
    # another host cannot be checked: refused even with clear_stale, clearable only with force
    (tmp_path / lk.LOCK_NAME).write_text(json.dumps({**rec, "host": "elsewhere"}))
    with pytest.raises(lk.LockError, match="host elsewhere"):
        lk.acquire(tmp_path, "x", clear_stale=True)
    assert "forced" in lk.clear(tmp_path, force=True)
    # a garbage lock file is reported, never treated as stale
    (tmp_path / lk.LOCK_NAME).write_text("{not json")
    with pytest.raises(lk.LockError, match="unreadable lock record"):
        lk.acquire(tmp_path, "x", clear_stale=True)


def test_a_holder_in_another_pid_namespace_or_on_a_same_named_machine_is_never_taken_for_dead(tmp_path):
    """Identified by host name and boot id only, a live job in a container that shares the host's name and kernel
    (another PID namespace: its pid is no process here, or another one) was declared stale and its run
    directory taken over by a second job (helper audit: both trained on, metrics.jsonl split between them);
    and a machine of the same host name was declared "rebooted"."""
    dead = {**lk._record("fake"), "pid": 2**22 + 12345, "start_time": 1}  # no such process here
    assert "no longer running" in lk.stale_reason(dead)  # same namespace: provably dead
    other_ns = {**dead, "pid_ns": "pid:[1]"}
    assert lk.stale_reason(other_ns) is None
    (tmp_path / lk.LOCK_NAME).write_text(json.dumps(other_ns))
    with pytest.raises(lk.LockError, match="in use by fake"):
        lk.acquire(tmp_path, "x", clear_stale=True)
    # ... unless its lock has gone silent: a container restarted (new namespace) after its job died must resume
    old_time = time.time() - lk.SILENT_S - 60
    os.utime(tmp_path / lk.LOCK_NAME, (old_time, old_time))
    assert "has not touched its lock" in lk.stale_reason(lk.read_holder(tmp_path))
    lk.acquire(tmp_path, "x", clear_stale=True).release()
    assert "rebooted" in lk.stale_reason({**dead, "boot_id": "another-boot"})  # this machine, rebooted
    if lk._machine_id():
        assert lk.stale_reason({**dead, "boot_id": "another-boot", "machine_id": "another-machine"}) is None
        # the same boot id is this running kernel, whatever machine id a container image carries
        assert "no longer running" in lk.stale_reason({**dead, "machine_id": "image-machine-id"})
    old = {k: v for k, v in dead.items() if k not in ("pid_ns", "machine_id")}  # a lock of the code before
    assert "no longer running" in lk.stale_reason(old)


def test_a_holder_touches_its_lock_until_it_releases_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lk, "HEARTBEAT_S", 0.05)
    lock = lk.acquire(tmp_path, "x")
    path = tmp_path / lk.LOCK_NAME
    os.utime(path, (1_000_000, 1_000_000))
    deadline = time.time() + 10
    while path.stat().st_mtime < time.time() - 60 and time.time() < deadline:
        time.sleep(0.05)
    assert lk.read_holder(tmp_path)["_age_s"] < 60  # touched again
    lock.release()
    time.sleep(0.2)
    assert not path.exists()


def test_release_never_removes_a_lock_that_changed_hands(tmp_path):
    with lk.locked(tmp_path, "first") as first:
        assert lk.read_holder(tmp_path)["token"] == first.record["token"]
        (tmp_path / lk.LOCK_NAME).unlink()  # e.g. cleared by hand while we ran, then taken by another job
        other = lk.acquire(tmp_path, "other")
    assert lk.read_holder(tmp_path)["token"] == other.record["token"]
    other.release()
    assert lk.read_holder(tmp_path) is None


def _race(directory: str, start: float, out) -> None:
    while time.time() < start:
        pass
    try:
        lk.acquire(directory, "racer")
        out.put("won")
    except lk.LockError:
        out.put("refused")


def test_exactly_one_of_many_simultaneous_jobs_gets_the_lock(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, q)) for _ in range(6)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == ["refused"] * 5 + ["won"]


def test_clearing_a_stale_lock_never_removes_a_fresh_one(tmp_path, monkeypatch):
    """Job B judged the lock stale; before B renamed it away, job A (a real second process) cleared the
    same stale lock and took a fresh one. B renamed A's live lock away and took the directory too."""
    import sys

    import trainer.lock as lk

    d = tmp_path / "run"
    d.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (d / lk.LOCK_NAME).write_text(json.dumps({**lk._record("crashed-job"), "pid": dead.pid, "start_time": 1}))
    job_a = subprocess.Popen([sys.executable, "-c", f"""
import sys, time; sys.path.insert(0, {str(ROOT)!r}); import trainer.lock as lk
input()
l = lk.acquire({str(d)!r}, 'job-A', clear_stale=True)
print('A', flush=True)
time.sleep(60)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    real, fired = lk.stale_reason, []

    def window(holder):  # B is inside clear(): the record is read, the rename has not happened yet
        if not fired and sys._getframe(1).f_code.co_name == "clear":
            fired.append(1)
            job_a.stdin.write("go\n")
            job_a.stdin.flush()
            assert job_a.stdout.readline().strip() == "A"
        return real(holder)

    monkeypatch.setattr(lk, "stale_reason", window)
    try:
        with pytest.raises(lk.LockError, match="in use by job-A"):
            lk.acquire(d, "job-B", clear_stale=True)
        assert fired and lk.read_holder(d)["what"] == "job-A"
    finally:
        job_a.kill()
        job_a.wait()


def test_a_requeued_slurm_job_takes_over_its_own_earlier_attempts_lock_on_another_node(tmp_path, monkeypatch):
    """Slurm ends a job with SIGTERM (preemption, time limit, node failure), which leaves rank 0's lock behind.
    Requeued, the job's rank 0 may run on another node (c10d assigns ranks by host name), where the lock's
    host cannot be checked: the requeue that train.sbatch relies on (run.resume=auto) was refused until
    someone ran ``trainer.lock clear --force``. Slurm starts a requeued job only after its earlier attempt ended."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    rec = {**lk._record("mva-train"), "host": "node3", "pid": 4242}
    (tmp_path / lk.LOCK_NAME).write_text(json.dumps(rec))
    # the same attempt (another step of the job on another node): never taken over
    with pytest.raises(lk.LockError, match="host node3"):
        lk.acquire(tmp_path, "x", clear_stale=True)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued attempt
    assert "requeued" in lk.stale_reason(lk.read_holder(tmp_path))
    with lk.locked(tmp_path, "mva-train", clear_stale=True) as mine:
        assert lk.read_holder(tmp_path)["token"] == mine.record["token"]
    # another Slurm job's lock on another node stays unknown: refused
    (tmp_path / lk.LOCK_NAME).write_text(json.dumps({**rec, "slurm_job": "76"}))
    with pytest.raises(lk.LockError, match="host node3"):
        lk.acquire(tmp_path, "x", clear_stale=True)
