"""What the benchmark scripts share: the synthetic stores they measure on, the weights the inference
benchmarks use, and running one measurement in a fresh child process whose own peak RSS comes from
``wait4`` (``ru_maxrss``: that process only, not the driver or earlier children).

Imported by the scripts next to it (``scripts/bench`` is ``sys.path[0]`` when one of them runs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "outputs" / "bench"
GENES, PEAKS = 2000, 10_000


def ensure_store(n_cells: int) -> Path:
    """The mva-synth store of ``n_cells`` cells (GENES x PEAKS) under outputs/bench/, written once."""
    path = BENCH / f"loader_{n_cells}.zarr"
    if not (path / "zarr.json").exists():
        print(f"writing synthetic store {path} ...", flush=True)
        subprocess.run([sys.executable, "-m", "data.synthetic", f"out={path}", f"n_cells={n_cells}",
                        f"n_genes={GENES}", f"n_regions={PEAKS}", "overwrite=true", "progress=false"],
                       cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return path


def ensure_model(path: Path, store: Path) -> str:
    """Say where the weights come from; copy or train them once (kept under outputs/bench/)."""
    if (path / "model.safetensors").is_file():
        return (path / "SOURCE").read_text().strip() if (path / "SOURCE").is_file() else f"given: {path}"
    src = BENCH / "train_1m_run" / "model"
    if (src / "model.safetensors").is_file():
        shutil.copytree(src, path)
        how = f"copy of {src.relative_to(ROOT)} (ours, trained 1 epoch on 1M mva-synth cells)"
    else:
        run = BENCH / "infer_model_run"
        shutil.rmtree(run, ignore_errors=True)  # resume=none refuses an earlier run's checkpoints
        subprocess.run([sys.executable, "-m", "trainer.train", f"data.store={store}", "run.epochs=1",
                        f"run.output_dir={run}", "run.resume=none", "logger.plot=false"],
                       cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
        shutil.copytree(run / "model", path)
        how = f"ours, trained 1 epoch on {store.name} by this script"
    (path / "SOURCE").write_text(how + "\n")
    return how


def run_worker(cmd: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> dict:
    """Run one worker command; its last ``RESULT {json}`` stdout line as a dict, plus ``peak_rss_mib``
    and ``process_wall_s``; or ``{"error": ...}`` with the tail of its stderr (``log``) or stdout."""
    if env is None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log if log is not None else os.devnull, "w") as err:
        r, w = os.pipe()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=w, stderr=err, env=env)
        os.close(w)
        t_start = time.perf_counter()
        with os.fdopen(r) as f:
            out = f.read()
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if code != 0 or not line:
        tail = log.read_text()[-600:] if log is not None else out[-400:]
        where = f"; see {log}" if log is not None else ""
        return {"error": f"exit {code}{where}: " + tail.replace("\n", " | ")}
    res = json.loads(line[-1][7:])
    res["peak_rss_mib"] = usage.ru_maxrss / 1024
    res["process_wall_s"] = time.perf_counter() - t_start
    return res


def cpu_s() -> float:
    """This process's CPU seconds, user + system, all threads (system time counts: page faults and
    page-cache copies are part of what a job costs), plus those of its waited-for child processes (the
    native kernels' compiler on a machine that has not built them yet)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def write_result(res: dict, out: str | Path) -> None:
    """Stamp the end load average into a benchmark's result dict, write it as JSON and say where."""
    res["loadavg_end"] = os.getloadavg()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))
    print(f"load average start {res['loadavg_start']}, end {res['loadavg_end']}; wrote {out}")
