"""One rank failing under torchrun: a dead rank stops the job promptly, a frozen rank (alive but stuck:
SIGSTOP) is caught by the process-group timeout (``dist.timeout_s``) instead of hanging for 30 min,
and the same command then resumes from the last checkpoint.

    .venv/bin/python -m pytest tests/test_reliability_dist.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.train_utils import PY, ROOT, as_cli, env, tiny_overrides, tiny_store

pytestmark = pytest.mark.slow

TIMEOUT_S = 15


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store", n_cells=800)


def _launch(store: Path, out: Path, epochs: int) -> tuple[list[str], subprocess.Popen]:
    ov = tiny_overrides(store, out, **{"run.epochs": epochs, "run.checkpoint_every_steps": 2,
                                       "dist.timeout_s": TIMEOUT_S})
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.train",
           *as_cli(ov)]
    return cmd, subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)


def _rank(launcher: subprocess.Popen, rank: str) -> psutil.Process:
    deadline = time.time() + 60
    while time.time() < deadline:
        found = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if p.environ().get("RANK") == rank]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no rank-{rank} worker found")


def _wait_for_checkpoint(out: Path, launcher: subprocess.Popen) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and not list((out / "checkpoints").glob("step_*")):
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        time.sleep(0.05)
    assert list((out / "checkpoints").glob("step_*")), "no checkpoint within 180 s"


def _resume_and_finish(cmd: list[str], out: Path, epochs: int) -> None:
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "resumed from" in r.stdout + r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["epochs"] == epochs and res["world_size"] == 2


def test_a_frozen_rank_is_caught_by_the_configured_timeout_and_the_run_resumes(store, tmp_path):
    out = tmp_path / "run"
    cmd, launcher = _launch(store, out, epochs=30)
    try:
        _wait_for_checkpoint(out, launcher)
        rank0, rank1 = _rank(launcher, "0"), _rank(launcher, "1")
        rank1.send_signal(signal.SIGSTOP)  # alive but stuck: torchrun cannot see it, only a timeout can
        t0 = time.time()
        gone, _ = psutil.wait_procs([rank0], timeout=TIMEOUT_S + 90)
        waited = time.time() - t0
        assert gone, f"rank 0 still blocked {waited:.0f} s after rank 1 froze (dist.timeout_s={TIMEOUT_S})"
        assert waited >= TIMEOUT_S * 0.8, f"rank 0 stopped after {waited:.0f} s: not the timeout"
    finally:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            p.send_signal(signal.SIGKILL)
        log, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "timed out" in log.lower() or "timeout" in log.lower(), log[-3000:]
    _resume_and_finish([c.replace("run.epochs=30", "run.epochs=3") for c in cmd], out, epochs=3)


def test_a_killed_rank_stops_the_others_promptly_and_the_run_resumes(store, tmp_path):
    out = tmp_path / "run"
    cmd, launcher = _launch(store, out, epochs=30)
    try:
        _wait_for_checkpoint(out, launcher)
        _rank(launcher, "1").send_signal(signal.SIGKILL)
        t0 = time.time()
        launcher.wait(timeout=TIMEOUT_S + 90)
        waited = time.time() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log = launcher.stdout.read()
    assert launcher.returncode != 0 and waited < TIMEOUT_S + 90, log[-3000:]
    _resume_and_finish([c.replace("run.epochs=30", "run.epochs=3") for c in cmd], out, epochs=3)


def test_a_killed_launcher_takes_its_ranks_with_it_and_the_run_resumes(store, tmp_path):
    """torchrun starts each rank in a session of its own: a SIGKILL of the launcher alone (OOM killer, kill -9 of
    the job's process group) left both ranks running without it, one of them seen waiting 25 min in a collective
    while holding the run directory's lock. Now the kernel kills them with it (PR_SET_PDEATHSIG)."""
    out = tmp_path / "run"
    cmd, launcher = _launch(store, out, epochs=30)
    ranks = []
    try:
        _wait_for_checkpoint(out, launcher)
        ranks = [_rank(launcher, "0"), _rank(launcher, "1")]
        assert all(os.getsid(r.pid) != os.getsid(launcher.pid) for r in ranks)  # out of the launcher's session
        launcher.send_signal(signal.SIGKILL)
        t0 = time.time()
        _, alive = psutil.wait_procs(ranks, timeout=30)
        waited = time.time() - t0
    finally:
        for p in ranks:
            if p.is_running():
                p.send_signal(signal.SIGKILL)
        launcher.communicate(timeout=60)
    assert not alive, f"ranks {[p.pid for p in alive]} outlived their launcher by {waited:.0f} s"
    assert waited < 10
    _resume_and_finish([c.replace("run.epochs=30", "run.epochs=3") for c in cmd], out, epochs=3)


def test_a_rank_killed_while_its_loader_worker_starts_takes_the_worker_with_it(store, tmp_path):
    """torch's worker watchdog compares the worker's parent with the one it saw once started (after a spawn's
    imports): a rank SIGKILLed during those seconds left its worker parented to init, and the worker never saw
    a change (one seen alive 1 h 50 min after a review's random kills). The worker now dies with its rank."""
    ov = tiny_overrides(store, tmp_path / "run", **{"run.epochs": 30, "data.num_workers": 1, "data.prefetch": 2})
    rank = subprocess.Popen([PY, "-m", "trainer.train", *as_cli(ov)], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.time() + 120
        while worker is None and time.time() < deadline and rank.poll() is None:
            worker = next((p for p in psutil.Process(rank.pid).children()
                           if "spawn_main" in " ".join(p.cmdline())), None)
            time.sleep(0.02)
        assert worker is not None, "no DataLoader worker started"
        rank.send_signal(signal.SIGKILL)  # the worker is still importing: torch's watchdog does not exist yet
        rank.wait(timeout=30)
        _, alive = psutil.wait_procs([worker], timeout=45)
    finally:
        if worker is not None and worker.is_running():
            worker.send_signal(signal.SIGKILL)
    assert not alive, f"the DataLoader worker {worker.pid} outlived its killed rank"
