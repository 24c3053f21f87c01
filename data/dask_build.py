"""mva-build's block-wise work as Dask tasks: per-block detection counts (filters) and one task per
output shard (read its input rows block by block, validate counts, remap to the aligned features, drop
cells, write the shard into the temporary store).

Where the tasks run (``dask_scheduler`` in conf/build.yaml):
  * null        - in this process, Dask's synchronous scheduler (one shard in memory at a time);
  * ``local``   - a LocalCluster of ``dask_workers`` single-threaded worker processes;
  * an address  - an existing cluster, e.g. ``tcp://10.77.0.1:8786``. Inputs and the output must be on a
                  path every worker reaches under the same name (a shared disk).
Workers open the inputs themselves from their paths (an open HDF5 handle cannot travel between
processes) and keep them open per worker for the next tasks.

Why the result is one valid store whoever writes what: the client plans every shard (its cells, its
first global cell index) before any task runs; a task writes its shard into a private staging group
and renames it into ``shards/<i>`` as the last step, so a shard at its final name is always whole. A
task whose worker died is rerun by Dask (up to ``distributed.scheduler.allowed-failures`` times) and
overwrites whatever an earlier attempt left; if it still fails, the client's StoreWriter aborts and
removes the temporary store. Only the client sums the per-shard statistics, in shard order, and writes
``complete: true`` and renames the store, so a build that failed never looks valid.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from data import keys
from data.config import InputConfig
from data.convert import open_input
from data.convert.align import Alignment, remap_columns
from data.filters import Block, apply_filters, block_detection, tree_sum
from data.store_format import StoreSchema, normalize_obs, write_shard
from data.store_stats import block_stats
from data.validate import ValidationError, check_counts, check_unmeasured_empty
from data.writer import StoreWriter

log = logging.getLogger("mva-build")
Compute = Callable[[list], list]


# ----------------------------------------------------------------------------------- where tasks run
@contextmanager
def executor(address: str | None, n_workers: int = 2, connect_timeout_s: float = 30) -> Iterator[Compute]:
    """A ``compute(list_of_delayed) -> list of results`` bound to the scheduler named by ``address``."""
    if not address:
        yield lambda tasks: list(dask.compute(*tasks, scheduler="synchronous"))
        return
    from distributed import Client, LocalCluster

    if address == "local":
        if n_workers < 1:
            raise ValidationError(f"dask_workers must be >= 1, got {n_workers}")
        # Single-threaded workers: each holds one shard in memory, and h5py serialises reads anyway.
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
                Client(cl) as client:
            client.register_plugin(_quiet_input_errors(), name="mva-quiet-input-errors")
            yield partial(_compute_on, client)
        return
    if "://" not in address:
        raise ValidationError(f"dask_scheduler={address!r}: expected null, 'local' or an address like "
                              "tcp://host:8786")
    try:
        client = Client(address, timeout=connect_timeout_s)
    except OSError as exc:
        raise ValidationError(f"dask_scheduler={address!r}: cannot reach the scheduler ({exc})") from exc
    with client:
        log.info("Dask cluster %s: %d worker(s)", address, len(client.scheduler_info()["workers"]))
        yield partial(_compute_on, client)


def _not_an_input_error_report(record: logging.LogRecord) -> bool:
    """A logging filter (False drops the record). distributed's worker logs every failed task as "Compute
    Failed" with its traceback; for a bad input (ValidationError) that block only repeats the one line
    mva-build prints when the client re-raises it."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (str(record.msg).startswith("Compute Failed") and len(args) > 3
                and str(args[3]).startswith(f"{ValidationError.__name__}("))


def _quiet_input_errors():
    """Worker plugin of the LocalCluster (its workers print to the user's terminal): drops the worker's
    report of a task that failed on a bad input; any other failure keeps its traceback there. (Built
    here: distributed is imported only when a cluster is asked for.)"""
    from distributed.diagnostics.plugin import WorkerPlugin

    class QuietInputErrors(WorkerPlugin):
        def setup(self, worker) -> None:
            logger = logging.getLogger("distributed.worker")
            if _not_an_input_error_report not in logger.filters:
                logger.addFilter(_not_an_input_error_report)

    return QuietInputErrors()


def _compute_on(client, tasks: list, settle_s: float = 300) -> list:
    """Results of ``tasks`` on the cluster. On failure, cancel them all and wait until no worker still
    runs (or is about to run) one of them before raising: a shard task finishing late must not write
    into a store that the caller is about to remove. Cancelling does not stop a running task's thread,
    and the scheduler forgets a cancelled task at once, so the workers themselves are asked."""
    futures = client.compute(tasks)
    try:
        return list(client.gather(futures))
    except BaseException:
        keys = {str(f.key) for f in futures}
        client.cancel(futures)
        deadline, said = time.monotonic() + settle_s, None
        while time.monotonic() < deadline:
            try:
                live = client.run(_live_task_keys, on_error="ignore")  # dead workers are skipped
            except OSError:  # the scheduler is gone: nothing more is scheduled
                break
            left = keys & {k for ks in live.values() for k in ks}
            if not left:
                break
            if len(left) != said:  # said once per count, not every 0.2 s
                log.info("build failed: waiting for %d task(s) still on the workers", len(left))
                said = len(left)
            time.sleep(0.2)
        raise


_LIVE = {"waiting", "ready", "constrained", "executing", "long-running", "cancelled", "resumed"}


def _live_task_keys(dask_worker) -> list[str]:
    """Keys of the tasks a worker runs or may still start (a cancelled task keeps running to its end)."""
    return [str(ts.key) for ts in dask_worker.state.tasks.values() if ts.state in _LIVE]


# ----------------------------------------------------------------------------------- worker side
_OPEN: dict[tuple, object] = {}
_OPEN_LOCK = threading.Lock()


def _source(inp: InputConfig):
    """The opened input on this worker, reused across tasks; reopened if a file changed on disk."""
    paths = [p for p in (inp.path, inp.rna, inp.atac) if p]
    key = (repr(inp), *((p, os.stat(p).st_mtime_ns) for p in paths))
    with _OPEN_LOCK:
        if key not in _OPEN:
            for old in [k for k in _OPEN if k[0] == key[0]]:  # the same input, changed on disk since
                _OPEN.pop(old).close()
            _OPEN[key] = open_input(inp)
        return _OPEN[key]


def close_sources() -> None:
    """Close the inputs this process opened for tasks (the synchronous scheduler runs them here)."""
    with _OPEN_LOCK:
        for src in _OPEN.values():
            src.close()
        _OPEN.clear()


def _detection(inp: InputConfig, start: int, stop: int, modality: str, colmap: np.ndarray, n_cols: int,
               keep: np.ndarray | None) -> np.ndarray:
    return block_detection(_source(inp)._rows(start, stop), modality, colmap, n_cols, keep)


@dataclass
class BuildContext:
    """What every shard task needs; one Dask key shared by all tasks."""

    inputs: list[InputConfig]
    colmaps: list[dict[str, np.ndarray | None]]
    schema: StoreSchema
    rna_var: pd.DataFrame  # the writer's normalised feature tables
    atac_var: pd.DataFrame
    tmp: str  # the temporary store every shard goes into
    block_size: int


@dataclass
class ShardJob:
    idx: int
    first_index: int  # global index of its first cell
    pieces: list[tuple[int, int, int, np.ndarray]]  # (input, first source row, stop row, keep mask of the rows)
    obs: pd.DataFrame  # the store columns of its cells (kept cells only, in order)


def _read_shard(ctx: BuildContext, job: ShardJob) -> tuple[sp.csr_matrix, sp.csr_matrix, list[str]]:
    G, R = len(ctx.rna_var), len(ctx.atac_var)
    parts: dict[str, list[sp.csr_matrix]] = {keys.RNA: [], keys.ATAC: []}
    names = []
    for i, start, stop, keep in job.pieces:
        src, cm = _source(ctx.inputs[i]), ctx.colmaps[i]
        names.append(src.name)
        for b0 in range(start, stop, ctx.block_size):
            b1 = min(b0 + ctx.block_size, stop)
            sel = np.flatnonzero(keep[b0 - start:b1 - start])
            for mod, x, n_cols in zip((keys.RNA, keys.ATAC), src._rows(b0, b1), (G, R)):
                if x is None or cm[mod] is None:
                    parts[mod].append(sp.csr_matrix((len(sel), n_cols), dtype=np.uint8))
                    continue
                x = sp.csr_matrix(x)
                check_counts(x, src.name, mod, src.obs.index[b0:b1], src.features[mod].index)
                x = remap_columns(x, cm[mod], n_cols)
                check_unmeasured_empty(x, src.obs[f"mask_{mod}"].to_numpy(bool)[b0:b1] | ~keep[b0 - start:b1 - start],
                                       src.name, mod, src.obs.index[b0:b1])  # dropped cells are not written
                parts[mod].append(x[sel])
    rna, atac = (sp.vstack(parts[m], format="csr") for m in (keys.RNA, keys.ATAC))
    return rna, atac, names


def shard_task(ctx: BuildContext, job: ShardJob) -> dict:
    """Write shard ``job.idx``; return its cell count and its partial statistics."""
    rna, atac, names = _read_shard(ctx, job)
    try:
        obs = normalize_obs(ctx.schema, job.obs, job.first_index)
    except (ValueError, KeyError) as exc:  # name the input, not just the cell
        raise ValidationError(f"{' / '.join(dict.fromkeys(names))}: {exc}") from exc
    try:
        stats = block_stats(rna, atac, obs, ctx.schema.batch_key, len(ctx.schema.batch_categories))
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc
    _write_atomically(ctx, job.idx, rna, atac, obs)
    return {"idx": job.idx, "n": len(obs), "stats": stats, "worker": _worker_address()}


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not on a distributed worker (synchronous scheduler)
        return "in-process"


def _write_atomically(ctx: BuildContext, idx: int, rna, atac, obs) -> None:
    tmp = Path(ctx.tmp)
    if not (tmp / "zarr.json").exists():  # the build was aborted (or the disk is not shared): write nothing
        raise RuntimeError(f"temporary store {tmp} is gone or not visible on this worker")
    stage = tmp / ".staging" / f"{idx:05d}-{secrets.token_hex(4)}"
    write_shard(zarr.open_group(str(stage), mode="w", zarr_format=3), idx, rna, atac, obs, ctx.rna_var, ctx.atac_var)
    final = tmp / "shards" / f"{idx:05d}"
    if final.exists():  # left by an earlier attempt of this task (a worker that died after its rename)
        shutil.rmtree(final)
    os.replace(stage / "shards" / f"{idx:05d}", final)
    shutil.rmtree(stage, ignore_errors=True)


# ----------------------------------------------------------------------------------- client side
def detection_filters(compute: Compute, inputs: Sequence[InputConfig], sources, keeps, al: Alignment,
                      min_fraction: dict[str, float], block_size: int) -> dict[str, list[str]]:
    """data.filters.apply_filters with the per-block counting done as Dask tasks on the workers."""
    def count(modality: str, blocks: list[Block], n_cols: int) -> np.ndarray:
        tasks = [dask.delayed(_detection, pure=True)(inputs[i], start, stop, modality, cm, n_cols, keep)
                 for i, start, stop, cm, keep in blocks]
        return compute([tree_sum(tasks)])[0]

    return apply_filters(sources, keeps, al, min_fraction, block_size, count)


def plan_shards(obs_list: list[pd.DataFrame], keeps: list[np.ndarray], shard_size: int) -> list[ShardJob]:
    """Cut the kept cells (inputs in order, rows in order) into shards of exactly ``shard_size`` cells."""
    kept_rows = [np.flatnonzero(k) for k in keeps]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in kept_rows])])
    jobs = []
    for idx, lo in enumerate(range(0, int(offsets[-1]), shard_size)):
        hi = min(lo + shard_size, int(offsets[-1]))
        pieces, obs = [], []
        for i, rows in enumerate(kept_rows):
            a, b = max(lo, offsets[i]) - offsets[i], min(hi, offsets[i + 1]) - offsets[i]
            if a >= b:
                continue
            start, stop = int(rows[a]), int(rows[b - 1]) + 1
            pieces.append((i, start, stop, keeps[i][start:stop].copy()))
            obs.append(obs_list[i].iloc[rows[a:b]])
        jobs.append(ShardJob(idx, lo, pieces, pd.concat(obs)))
    return jobs


def write_shards(compute: Compute, writer: StoreWriter, inputs: Sequence[InputConfig], al: Alignment,
                 obs_list: list[pd.DataFrame], keeps: list[np.ndarray], block_size: int) -> None:
    """Run every shard task, then hand the writer the totals so that its ``close()`` finishes the store."""
    if writer.n_appended:
        raise RuntimeError("write_shards needs a fresh StoreWriter")
    jobs = plan_shards(obs_list, keeps, writer.shard_size)
    writer.root.require_group("shards")  # created once here, not raced by the tasks
    ctx = BuildContext(list(inputs), al.colmaps, writer.schema, writer.rna_var, writer.atac_var, str(writer.tmp),
                       block_size)
    ctx_key = dask.delayed(ctx, pure=True)  # one copy sent to each worker, not one per task
    results = sorted(compute([dask.delayed(shard_task, pure=True)(ctx_key, j) for j in jobs]), key=lambda r: r["idx"])
    if [r["idx"] for r in results] != list(range(len(jobs))):
        raise RuntimeError("a shard task result is missing")
    for r in results:  # summed in shard order: the same numbers whichever worker wrote what
        writer.register_shard(r["n"], r["stats"])
    log.info("%d shards written by %s", len(results), dict(Counter(r["worker"] for r in results)))
    shutil.rmtree(Path(writer.tmp) / ".staging", ignore_errors=True)
    missing = [j.idx for j in jobs if not (Path(writer.tmp) / "shards" / f"{j.idx:05d}" / "zarr.json").exists()]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} are missing on disk after their tasks finished: is the output "
                           "on a disk every worker shares under the same path?")
