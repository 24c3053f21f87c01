"""Multi-node torchrun across two hosts (network namespaces from scripts/twohost.sh), as root.

    .venv/bin/python -m pytest tests/test_multinode.py -q -s      # -s prints the measured timings

One torchrun agent per host (1 process each) with the c10d rendezvous on host a; store and run
directory on the shared disk. Compared with 1-host torchrun runs of the same global batch and seed.
The embed job and the relaunch after the host loss go through scripts/slurm/*.sbatch.
Set MVA_MULTINODE_TIMINGS=path.json to also write the timings (docs/benchmarks.md "Multi-node").
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from data.store import open_store
from tests.train_utils import PY, ROOT, as_cli, env, tiny_overrides, tiny_store, train_cli
from trainer import checkpoint as ckpt

TWOHOST = ROOT / "scripts" / "twohost.sh"
TIMEOUT_S = 15  # dist.timeout_s of these runs: how long a survivor may wait on a silent peer
EXTRA = {"run.epochs": 2, "run.checkpoint_every_steps": 5, "run.keep_checkpoints": 3, "dist.timeout_s": TIMEOUT_S}
TIMINGS: dict[str, float] = {}


def _netns_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    r = subprocess.run([str(TWOHOST), "run", "true", "true"], check=False, capture_output=True, text=True, timeout=60)
    return None if r.returncode == 0 else f"cannot create network namespaces: {r.stderr.strip()[-300:]}"


_REASON = _netns_reason() if os.name == "posix" else "not on Linux"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]


def _train_cmd(overrides: dict, run_dir: Path, host: str) -> str:
    """scripts/train.sh in multi-node mode, as one host runs it (host a serves the rendezvous)."""
    ov = {k: v for k, v in overrides.items()}
    ov["run"] = {k: v for k, v in ov["run"].items() if k != "output_dir"}
    launch = (f"NNODES=2 RDZV_ENDPOINT=$ADDR_A:29400 LOCAL_ADDR=$HOST_ADDR RUN_DIR={shlex.quote(str(run_dir))} "
              f"RDZV_CONF=is_host={'true' if host == 'a' else 'false'}")
    return f"{launch} scripts/train.sh {' '.join(shlex.quote(a) for a in as_cli(ov))}"


def _slurm_cmd(script: str, args: list[str], host: str, shims: Path, **env: str) -> str:
    """scripts/slurm/<script> as the batch step of a 2-node job would run it on one host. There is no
    Slurm here: ``srun`` runs its command once on this host (as srun does on each node) and ``scontrol``
    names host a as the first node; everything after that is the real script and the real torchrun."""
    shims.mkdir(exist_ok=True)
    for name, body in (("srun", 'while [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"'),
                       ("scontrol", 'echo "$ADDR_A"')):
        (shims / name).write_text(f"#!/bin/sh\n{body}\n")
        (shims / name).chmod(0o755)
    pairs = {"PATH": f"{shims}:$PATH", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]",
             "SLURM_SUBMIT_DIR": str(ROOT), "NPROC_PER_NODE": "1", "LOCAL_ADDR": "$HOST_ADDR",
             "RDZV_CONF": f"is_host={'true' if host == 'a' else 'false'}", **env}
    return " ".join(f"{k}={v}" for k, v in pairs.items()) + f" bash scripts/slurm/{script} " + " ".join(
        shlex.quote(a) for a in args)


def _twohost(cmd_a: str, cmd_b: str, run_id: str | None = None, **popen) -> subprocess.Popen:
    e = env()
    if run_id:
        e["TWOHOST_ID"] = run_id
    return subprocess.Popen([str(TWOHOST), "run", cmd_a, cmd_b], cwd=ROOT, env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _finish(p: subprocess.Popen, timeout: float) -> str:
    """The harness's output once it ended; past ``timeout`` it is stopped (its trap tears both hosts down)."""
    try:
        return p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        p.terminate()
        out = p.communicate(timeout=60)[0]
        raise AssertionError(f"two-host run still going after {timeout} s:\n{out[-5000:]}") from None


def _run_two_hosts(cmd_a: str, cmd_b: str, timeout: int = 300) -> tuple[str, float]:
    t0 = time.time()
    p = _twohost(cmd_a, cmd_b)
    out = _finish(p, timeout)
    assert p.returncode == 0, out[-5000:]
    return out, time.time() - t0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training on 1 host x 2 processes and on 2 hosts x 1 process (uninterrupted)."""
    root = tmp_path_factory.mktemp("multinode")
    store = tiny_store(root / "store")
    t0 = time.time()
    train_cli(tiny_overrides(store, root / "one_host", **EXTRA), nproc=2, timeout=300)
    TIMINGS["train_1host_2proc_s"] = time.time() - t0
    ov = tiny_overrides(store, root / "two_hosts", **EXTRA)
    log, TIMINGS["train_2host_1proc_each_s"] = _run_two_hosts(_train_cmd(ov, root / "two_hosts", "a"),
                                                              _train_cmd(ov, root / "two_hosts", "b"))
    assert "[a] [train] done" in log or "[b] [train] done" in log, log[-3000:]
    return store, root


def test_two_hosts_equal_one_host(runs):
    _, root = runs
    one, two = json.loads((root / "one_host" / "result.json").read_text()), json.loads(
        (root / "two_hosts" / "result.json").read_text())
    assert two["world_size"] == one["world_size"] == 2 and two["steps"] == one["steps"] > 0
    a, b = _weights(root / "one_host"), _weights(root / "two_hosts")
    assert a.keys() == b.keys()
    # bit for bit: a 2-rank gloo sum is a + b on both layouts (measured max |diff| 0.0)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=f"{k}: 2 hosts != 1 host")
    # not vacuous: the weights moved since the first kept checkpoint
    first = min((root / "two_hosts" / "checkpoints").glob("step_*"))
    early = torch.load(first / "model.pt", weights_only=True)["model"]
    assert max(float((b[k] - early[k].float()).abs().max()) for k in b if k in early) > 1e-4


def test_two_host_embed_writes_every_cell_once_in_order(runs, tmp_path):
    from trainer.infer import infer
    from trainer.infer_config import InferConfig

    store, root = runs
    model = root / "two_hosts"
    infer(InferConfig(model_dir=str(model), store=str(store), output=str(tmp_path / "one.zarr"), batch_size=96,
                      progress=False))
    out = tmp_path / "two.zarr"
    args = [f"model_dir={model}", f"store={store}", f"output={out}", "batch_size=96", "progress=false"]
    # through scripts/slurm/infer.sbatch (see _slurm_cmd)
    _, TIMINGS["embed_2host_s"] = _run_two_hosts(*(_slurm_cmd("infer.sbatch", args, h, tmp_path / "shims", PY=PY)
                                                   for h in "ab"))
    one, two = ad.read_zarr(str(tmp_path / "one.zarr")), ad.read_zarr(str(out))
    cells = open_store(store).read_obs().index
    assert two.obs_names.is_unique and list(two.obs_names) == list(cells)  # every cell once, store order
    pd.testing.assert_frame_equal(one.obs, two.obs)
    assert set(one.obsm) == set(two.obsm) and one.obsm
    for k in one.obsm:
        np.testing.assert_allclose(np.asarray(two.obsm[k]), np.asarray(one.obsm[k]), rtol=1e-5, atol=1e-6)


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else []
        if done:
            return int(done[-1].name.split("_")[1])
        if proc.poll() is not None:
            raise AssertionError(f"two-host run ended before its first checkpoint:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint within the timeout")


def test_host_lost_mid_epoch_survivor_exits_within_timeout_and_relaunch_resumes_equal(runs):
    """Host b drops off the network (link down, then every process on it SIGKILLed: no FIN reaches host
    a, like a power loss). Host a's rank blocks in its next all-reduce until dist.timeout_s, fails, and
    its agent exits; relaunching both hosts resumes from the last checkpoint to the uninterrupted weights."""
    store, root = runs
    run = root / "lost"
    ov = tiny_overrides(store, run, **EXTRA)
    run_id = f"{os.getpid() % 65536:x}{int(time.time() * 1000) % 65536:04x}"
    proc = _twohost(_train_cmd(ov, run, "a"), _train_cmd(ov, run, "b"), run_id=run_id)
    killed_at = _wait_for_checkpoint(run, proc)
    total = json.loads((root / "two_hosts" / "result.json").read_text())["steps"]
    ns_b, if_b = f"mva-{run_id}-b", f"mv{run_id}b"
    subprocess.run(["ip", "-n", ns_b, "link", "set", if_b, "down"], check=True)
    t_lost = time.time()
    pids = subprocess.run(["ip", "netns", "pids", ns_b], check=False, capture_output=True, text=True).stdout.split()
    assert pids, "host b had no processes"
    subprocess.run(["kill", "-9", *pids], check=False)
    out = _finish(proc, TIMEOUT_S * 6)
    TIMINGS["survivor_exit_after_host_loss_s"] = survivor = time.time() - t_lost
    assert proc.returncode != 0, out[-3000:]
    assert not (run / "result.json").exists(), "the run finished before host b was lost: nothing was tested"
    assert "exit a=" in out and "exit a=0" not in out, out[-3000:]
    # The survivor waited for the silent peer (no error came over the wire) but not past the timeout.
    assert survivor < TIMEOUT_S + 45, f"survivor took {survivor:.1f} s (dist.timeout_s={TIMEOUT_S}):\n{out[-3000:]}"
    last = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert killed_at <= last < total

    # the relaunch is a requeued Slurm job: scripts/slurm/train.sbatch (see _slurm_cmd), same run dir
    args = as_cli({**ov, "run": {k: v for k, v in ov["run"].items() if k not in ("output_dir", "resume")}})
    log, TIMINGS["relaunch_2host_s"] = _run_two_hosts(*(
        _slurm_cmd("train.sbatch", args, h, root / "shims", PY=PY, RUN_DIR=str(run)) for h in "ab"))
    assert f"resumed from {run / 'checkpoints' / f'step_{last:09d}'}" in log, log[-3000:]
    assert json.loads((run / "result.json").read_text())["steps"] == total
    ref, got = _weights(root / "two_hosts"), _weights(run)
    TIMINGS["resumed_vs_uninterrupted_max_abs_diff"] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    one = _weights(root / "one_host")
    TIMINGS["two_hosts_vs_one_host_max_abs_diff"] = max(float((one[k] - ref[k]).abs().max()) for k in ref)
    # Bit for bit (tests/test_determinism.py resumes from every kind of checkpoint). The earlier ~1e-5
    # gaps were runs whose code changed between the uninterrupted run and the relaunch (a shared
    # checkout): checkpoints record a code fingerprint, so such a failure names that cause.
    differ = [k for k in ref if not torch.equal(got[k], ref[k])]
    fingerprint = [torch.load(ckpt.complete_checkpoints(r)[-1] / "trainer.pt", weights_only=True).get("code_fingerprint")
                   for r in (root / "two_hosts", run)]
    assert not differ, (f"{len(differ)} of {len(ref)} tensors differ after host loss + resume (max |diff| "
                        f"{TIMINGS['resumed_vs_uninterrupted_max_abs_diff']:.3g}): {differ[:4]}"
                        + ("; NOTE the two runs ran different trainer/loader code" if len(set(fingerprint)) > 1 else ""))


def teardown_module(module):
    if TIMINGS:
        print("\n[multinode timings] " + json.dumps({k: round(v, 2) for k, v in TIMINGS.items()}))
        load = os.getloadavg()
        print(f"[multinode timings] load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        if os.environ.get("MVA_MULTINODE_TIMINGS"):
            Path(os.environ["MVA_MULTINODE_TIMINGS"]).write_text(
                json.dumps({**{k: round(v, 2) for k, v in TIMINGS.items()}, "loadavg_1m": load[0]}, indent=1))
