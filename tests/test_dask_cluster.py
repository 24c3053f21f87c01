"""mva-build on Dask: a LocalCluster, and a cluster across two hosts (scripts/twohost.sh), as root.

    .venv/bin/python -m pytest tests/test_dask_cluster.py -q

The real BMMC starter pair (shared disk, read-only) is converted in-process (the default) and on the
clusters; the stores must be equal cell by cell. On two hosts the scheduler and one worker run on host
a, one worker on host b, the build's client on host a; host b is then killed while it is writing a
shard: Dask reruns the lost shard on host a (same store), or, with no retries allowed, the build fails
and leaves nothing that looks like a store.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from data.build import build_store
from data.config import BuildConfig, InputConfig
from data.store import open_store
from data.validate import ValidationError

ROOT = Path(__file__).resolve().parent.parent
TWOHOST = ROOT / "scripts" / "twohost.sh"
DATA = Path("/work/shared/data/neurips2021_bmmc_multiome_starter")
PY = sys.executable
DASK = str(Path(PY).parent / "dask")
SHARD, BLOCK = 40, 16  # 13 shards of the 500 cells: enough tasks for both workers
TIMINGS: dict[str, float] = {}  # printed at the end (-s); MVA_DASK_TIMINGS=path.json also writes them


def _cfg(out: Path, **kw) -> BuildConfig:
    return BuildConfig(out=str(out), inputs=[InputConfig(kind="h5ad_pair", rna=str(DATA / "bmmc_starter_rna.h5ad"),
                                                         atac=str(DATA / "bmmc_starter_atac.h5ad"))],
                       label_key="cell_type", shard_size=SHARD, block_size=BLOCK, min_gene_fraction=0.01,
                       progress=False, **kw)


def _cli_args(out: Path, scheduler: str) -> str:
    c = _cfg(out)
    inp = c.inputs[0]
    args = [f"out={out}", f"label_key={c.label_key}", f"shard_size={SHARD}", f"block_size={BLOCK}",
            f"min_gene_fraction={c.min_gene_fraction}", "progress=false",
            f"inputs=[{{kind: h5ad_pair, rna: {inp.rna}, atac: {inp.atac}}}]"]
    return " ".join(shlex.quote(a) for a in args) + f" dask_scheduler={scheduler}"  # the shell expands $ADDR_A


def _contents(path: Path):
    st = open_store(path)
    m = st.meta
    rows = {mod: [st.read_rows(mod, i, 0, m.shard_offsets[i + 1] - m.shard_offsets[i]) for i in range(m.n_shards)]
            for mod in ("rna", "atac")}
    stats = {k: np.asarray(v) for k, v in zarr.open_group(str(path), mode="r")["stats"].arrays()}
    return m, st.read_obs(), rows, stats


def assert_same_store(got: Path, ref: Path) -> None:
    gm, gobs, grows, gstats = _contents(got)
    rm, robs, rrows, rstats = _contents(ref)
    assert gm.shard_offsets == rm.shard_offsets and gm.n_shards > 2
    assert (gm.gene_names, gm.region_names, gm.batch_categories) == (rm.gene_names, rm.region_names, rm.batch_categories)
    pd.testing.assert_frame_equal(gobs, robs)
    for mod in rrows:
        for i, (a, b) in enumerate(zip(grows[mod], rrows[mod], strict=True)):
            assert a.shape == b.shape and a.dtype == b.dtype and (a != b).nnz == 0, f"{mod} shard {i} differs"
    assert gstats.keys() == rstats.keys()
    for k in rstats:
        np.testing.assert_array_equal(gstats[k], rstats[k], err_msg=k)


def test_bad_scheduler_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValidationError, match=r"dask_scheduler='10.0.0.1:8786': expected null, 'local' or an address"):
        build_store(_cfg(tmp_path / "a.zarr", dask_scheduler="10.0.0.1:8786"))
    with pytest.raises(ValidationError, match="preshuffle=true runs in one process"):
        build_store(_cfg(tmp_path / "b.zarr", dask_scheduler="local", preshuffle=True))
    with pytest.raises(ValidationError, match="dask_workers must be >= 1"):
        build_store(_cfg(tmp_path / "c.zarr", dask_scheduler="local", dask_workers=0))
    assert not list(tmp_path.iterdir()), "a refused build left files behind"


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    t0 = time.time()
    out = build_store(_cfg(tmp_path_factory.mktemp("dask") / "inprocess.zarr"))
    TIMINGS["build_in_process_s"] = time.time() - t0
    return out


def test_detection_filter_tasks_keep_the_features_data_filters_keeps(local_store):
    """The Dask filter tasks apply the same rule as data.filters (the preshuffle path's filters)."""
    from data.convert import open_input
    from data.convert.align import align
    from data.filters import apply_filters

    cfg = _cfg(Path("unused"))
    src = open_input(cfg.inputs[0])
    try:
        al = align([src.features], [src.name], cfg.feature_join)
        removed = apply_filters([src], [np.ones(len(src.obs), bool)], al, {"rna": cfg.min_gene_fraction}, BLOCK)
    finally:
        src.close()
    meta = open_store(local_store).meta
    assert removed["rna"] and list(meta.gene_names) == list(al.names["rna"])


@pytest.mark.slow
def test_local_cluster_build_equals_in_process_build(local_store, tmp_path, caplog):
    caplog.set_level("INFO", logger="mva-build")
    t0 = time.time()
    out = build_store(_cfg(tmp_path / "local.zarr", dask_scheduler="local", dask_workers=2))
    TIMINGS["build_local_cluster_2_workers_s"] = time.time() - t0  # includes starting the cluster
    assert_same_store(out, local_store)
    written = re.search(r"shards written by (\{.*\})", caplog.text)
    assert written and "in-process" not in written.group(1), caplog.text[-2000:]



def test_a_bad_input_on_a_local_cluster_is_one_line_not_the_workers_traceback(tmp_path):
    """distributed's workers log a failed task as "Compute Failed" plus its traceback, straight to the
    terminal of a LocalCluster; for a bad count that block stood before mva-build's own one-line error."""
    import anndata as ad
    import scipy.sparse as sp

    obs = pd.DataFrame(index=[f"c{i}" for i in range(60)])
    rna = sp.csr_matrix(np.random.default_rng(0).poisson(1.0, (60, 30)).astype(np.float32))
    rna[5, 3] = 1.5  # not a count
    atac = sp.csr_matrix((np.random.default_rng(1).random((60, 40)) < 0.2).astype(np.float32))
    ad.AnnData(rna, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(30)])).write_h5ad(tmp_path / "rna.h5ad")
    ad.AnnData(atac, obs=obs, var=pd.DataFrame(index=[f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(40)])
               ).write_h5ad(tmp_path / "atac.h5ad")
    r = subprocess.run([PY, "-m", "data.build", f"out={tmp_path / 's.zarr'}", "batch_key=null", "shard_size=20",
                        "progress=false", "dask_scheduler=local", "dask_workers=1",
                        f"inputs=[{{kind: h5ad_pair, rna: {tmp_path / 'rna.h5ad'}, atac: {tmp_path / 'atac.h5ad'}}}]"],
                       capture_output=True, text=True, timeout=180, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    errors = [ln for ln in out.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "rna count of cell 'c5', feature 'g3'" in errors[0], out[-3000:]
    assert "Compute Failed" not in out and "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "s.zarr").exists()


def test_only_bad_input_reports_are_dropped_from_the_workers_log():
    """Any other task failure keeps the worker's report (its traceback is the only one on a remote worker)."""
    import logging

    from data.dask_build import _not_an_input_error_report

    def record(exception_text: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                                 "Compute Failed\nKey: %s\nState: %s\nTask: %s\nException: %r\nTraceback: %r\n",
                                 ("k", "executing", "t", exception_text, "tb"), None)

    assert not _not_an_input_error_report(record("ValidationError('bad count')"))
    assert _not_an_input_error_report(record("RuntimeError('a bug')"))
    assert _not_an_input_error_report(logging.LogRecord("distributed.worker", logging.WARNING, __file__, 1,
                                                        "worker %s lost", ("x",), None))

def _netns_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    r = subprocess.run([str(TWOHOST), "run", "true", "true"], check=False, capture_output=True, text=True, timeout=60)
    return None if r.returncode == 0 else f"cannot create network namespaces: {r.stderr.strip()[-300:]}"


needs_netns = pytest.mark.skipif((reason := _netns_reason()) is not None, reason=str(reason))

# Waits until the worker on host b is running a shard task, then kills every process on host b.
KILL_B_WHEN_BUSY = r"""
import os, signal, sys, time
from distributed import Client
c = Client(sys.argv[1], timeout=60)
deadline = time.time() + 120
while time.time() < deadline:
    busy = [t for w, ts in c.processing().items() if w.startswith("tcp://" + sys.argv[2]) for t in ts]
    if any("shard_task" in str(t) for t in busy):
        # `ip netns pids` does not work from inside a namespace: find host b's processes by the env
        # twohost.sh gave them
        mark = [f"TWOHOST_ID={sys.argv[3]}".encode(), b"TWOHOST_HOST=b"]
        pids = []
        for d in os.listdir("/proc"):
            try:
                env = open(f"/proc/{d}/environ", "rb").read().split(b"\0") if d.isdigit() else []
            except OSError:
                continue
            if all(m in env for m in mark):
                pids.append(int(d))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        print(f"KILLED host b ({len(pids)} processes) while it ran", busy, flush=True)
        sys.exit(0)
    time.sleep(0.005)
sys.exit("host b never ran a shard task")
"""


def _cluster_build(out: Path, tmp_path: Path, kill_b: bool = False, scheduler_env: str = "") -> subprocess.CompletedProcess:
    sched = "tcp://$ADDR_A:8786"
    worker = f"{DASK} worker {sched} --host $HOST_ADDR --nthreads 1 --no-dashboard --death-timeout 60"
    killer = "true"
    if kill_b:
        (tmp_path / "kill_b.py").write_text(KILL_B_WHEN_BUSY)
        killer = f"{PY} {tmp_path / 'kill_b.py'} {sched} $ADDR_B $TWOHOST_ID"
    cmd_a = (f"{scheduler_env} {DASK} scheduler --host $HOST_ADDR --port 8786 --no-dashboard & "
             f"{worker} --name a & "
             f"{PY} -c \"from distributed import Client; Client('{sched}', timeout=60).wait_for_workers(2, timeout=120)\""
             f" || exit 3; {PY} -m data.build {_cli_args(out, sched)} & build=$!; {killer}; wait $build")
    env = dict(os.environ, OMP_NUM_THREADS="1", TWOHOST_MAIN="a", PYTHONPATH=str(ROOT))
    # the build's own time, client start to "wrote" (the cluster start-up is not included)
    cmd_a = cmd_a.replace(f"{PY} -m data.build", f"/usr/bin/time -f 'BUILD_SECONDS %e' {PY} -m data.build")
    return subprocess.run([str(TWOHOST), "run", cmd_a, f"{worker} --name b"], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@needs_netns
def test_two_host_cluster_build_equals_local_build(local_store, tmp_path):
    out = tmp_path / "cluster.zarr"
    r = _cluster_build(out, tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    TIMINGS["build_2host_cluster_s"] = float(re.search(r"BUILD_SECONDS ([\d.]+)", r.stdout).group(1))
    assert_same_store(out, local_store)
    written = re.search(r"shards written by (\{.*\})", r.stdout)
    assert written, r.stdout[-3000:]
    # shards came from workers on both hosts, into one store on the shared disk
    assert "tcp://10.77.0.1:" in written.group(1) and "tcp://10.77.0.2:" in written.group(1), written.group(1)


@pytest.mark.slow
@needs_netns
def test_worker_host_killed_mid_build_is_retried_to_the_same_store(local_store, tmp_path):
    out = tmp_path / "cluster.zarr"
    r = _cluster_build(out, tmp_path, kill_b=True)
    assert re.search(r"KILLED host b \([1-9]\d* processes\) while it ran", r.stdout), r.stdout[-4000:]
    assert "exit a=0 b=137" in r.stdout and re.search(r"Remove worker.*tcp://10\.77\.0\.2", r.stdout), r.stdout[-4000:]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    TIMINGS["build_2host_cluster_host_b_killed_s"] = float(re.search(r"BUILD_SECONDS ([\d.]+)", r.stdout).group(1))
    assert_same_store(out, local_store)


@pytest.mark.slow
@needs_netns
def test_worker_host_killed_without_retries_fails_with_no_store(tmp_path):
    out = tmp_path / "cluster.zarr"
    r = _cluster_build(out, tmp_path, kill_b=True,
                       scheduler_env="DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0")
    assert re.search(r"KILLED host b \([1-9]\d* processes\) while it ran", r.stdout), r.stdout[-4000:]
    assert r.returncode != 0 and "KilledWorker" in r.stdout, r.stdout[-4000:]
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "shards/0" not in str(p))
    assert not out.exists() and not list(tmp_path.glob("cluster.zarr.tmp-*")), (left, r.stdout[-3000:])


def teardown_module(module):
    if TIMINGS:
        load = os.getloadavg()
        print("\n[dask timings] " + json.dumps({k: round(v, 2) for k, v in TIMINGS.items()}) +
              f" load average {load[0]:.2f}")
        if os.environ.get("MVA_DASK_TIMINGS"):
            Path(os.environ["MVA_DASK_TIMINGS"]).write_text(
                json.dumps({**{k: round(v, 2) for k, v in TIMINGS.items()}, "loadavg_1m": load[0]}, indent=1))
