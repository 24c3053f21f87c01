"""Run tracking: ``metrics.jsonl`` (always, rank 0), W&B (rank 0, lazily imported, never blocking),
and ``loss.png`` at the end.

Other ranks get a ``MetricsWriter`` whose methods do nothing, so the loop calls it unconditionally.
W&B ``online`` without an API key, or whose server does not answer within ``ONLINE_INIT_TIMEOUT_S``, falls
back to ``offline``: a run must never wait on the network. Each W&B row carries its training step as the
metric ``step``, the x axis of every chart (``_use_training_step_axis``), so the steps a resumed run logs
again are kept.
Only metric values and the resolved config are sent; environment variables (keys) never are.
"""

from __future__ import annotations

import json
import os
import secrets
from itertools import pairwise
from pathlib import Path
from typing import Any

import psutil
import torch


class StepClock:
    """The time bookkeeping of train records: ``cells_per_s`` is the training rate over training steps only.

    A step's time is its wait for the batch plus its compute. What happens between steps (validation,
    checkpoint writes, the model export, metric records) is not a step; nor is the first batch of an epoch
    (or of a resumed run), which waits for the loader to start from nothing (with ``data.num_workers`` > 0,
    spawned worker processes that import torch). All of that is reported as ``non_step_s``, so the wall time
    since the previous record is ``step_s + non_step_s``. Before, the first record of every epoch divided
    its cells by a window that also held the previous epoch's validation and checkpoint."""

    def __init__(self, now: float) -> None:
        self._start = now
        self.cells, self.step_s, self.wait_s = 0, 0.0, 0.0

    def add_step(self, cells: int, wait_s: float, compute_s: float, loader_start: bool = False) -> None:
        """One training step of ``cells`` cells (over all ranks). ``loader_start``: its wait was the
        loader's start-up, not a data wait of training."""
        self.cells += cells
        self.step_s += compute_s + (0.0 if loader_start else wait_s)
        self.wait_s += 0.0 if loader_start else wait_s

    def take(self, now: float) -> dict[str, float]:
        """The record's rate fields since the previous ``take`` (or the start), and a new window from ``now``."""
        out = {"cells_per_s": self.cells / self.step_s if self.step_s > 0 else float("nan"),
               "data_wait_s": self.wait_s, "non_step_s": max(0.0, now - self._start - self.step_s)}
        self.__init__(now)
        return out


def memory_mb() -> dict[str, float]:
    """Memory fields of a train record.

    ``mem_rss_mb``: this process's resident memory now (not a peak; the trainer keeps large freed blocks in
    its heap for reuse, trainer/alloc.py, so during training it stays near the steps' high-water mark).
    ``mem_gpu_mb`` (only where an accelerator is available: CUDA, or any other torch.accelerator): the peak
    memory allocated on it since the previous call. The peak counter is reset after reading, so each record
    reports the peak of its own window; it used to be the peak since the process started, which never came
    down after a large first epoch or validation."""
    out = {"mem_rss_mb": psutil.Process().memory_info().rss / 2**20}
    acc = torch.accelerator
    if acc.is_available():
        out["mem_gpu_mb"] = acc.max_memory_allocated() / 2**20
        acc.reset_peak_memory_stats()
    return out


class MetricsWriter:
    def __init__(self, run_dir: str | Path, *, enabled: bool, wandb_mode: str = "disabled",
                 project: str = "multivi-atlas", tags: list[str] | None = None,
                 config: dict[str, Any] | None = None, run_name: str | None = None,
                 resume_step: int | None = None) -> None:
        """``resume_step``: the run continues from a checkpoint of that step (0: starts afresh); records of
        later steps (logged after that checkpoint by the run that was killed) are dropped, since the
        resumed run logs them again."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            _drop_records_after(self.path, resume_step)
        self._fh = open(self.path, "a", buffering=1)  # noqa: SIM115 - open for the run; line-buffered: a killed run keeps its lines
        if wandb_mode != "disabled":
            run_id = wandb_run_id(Path(run_dir), continuing=bool(resume_step))
            self._wandb = _start_wandb(Path(run_dir), wandb_mode, project, tags or [], config or {}, run_name,
                                       run_id)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, float) or hasattr(v, "item") else v) for k, v in record.items()}
        try:
            self._fh.write(json.dumps(clean) + "\n")
        except OSError as exc:  # a full disk: "[Errno 28] No space left on device" named no file
            raise OSError(exc.errno, f"{exc.strerror}: writing {self.path} (the run's checkpoints are in "
                                     f"{self.path.parent / 'checkpoints'}; free space and rerun: resume=auto "
                                     "continues from the newest complete one)") from None
        if self._wandb is not None:
            # no step=: the training step is a metric of the row (STEP_KEY), see _use_training_step_axis
            self._call_wandb("log", {k: v for k, v in clean.items() if isinstance(v, (int, float))})

    def _call_wandb(self, method: str, *args) -> None:
        """Call the W&B run; if W&B fails (its service process was killed, e.g. by the OOM killer, and every
        call raises ConnectionResetError), say so once and go on without it: tracking must never stop
        training, and metrics.jsonl keeps every record."""
        try:
            getattr(self._wandb, method)(*args)
        except Exception as exc:  # noqa: BLE001 - any W&B failure: the run goes on
            why = (str(exc).splitlines() or [""])[0]
            print(f"[metrics] wandb {method} failed ({type(exc).__name__}: {why}): W&B off for the rest of "
                  f"this run; {self.path} has every record", flush=True)
            self._wandb = None
            _reset_wandb()

    def close(self, plot: bool = True) -> None:
        if not self.enabled:
            return
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._wandb is not None:
            self._call_wandb("finish")
            self._wandb = None
        if plot:
            plot_losses(self.path, self.path.parent / "loss.png")


def _reset_wandb() -> None:
    """Drop wandb's connection to its dead service process, so that a later run in this process (a Hydra
    multirun member) starts a new one instead of failing on the broken connection."""
    import wandb

    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001, S110 - the service is gone already; teardown only forgets it
        pass


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (atomically) without the records of steps after ``step``; a torn last line of a
    killed run is dropped too."""
    keep = []
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(rec.get("step", 0)) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path, continuing: bool) -> str:
    """The W&B run id of this run directory: the stored one when the run continues from a checkpoint,
    else a new one, stored (atomically) for the attempts that will continue this one.

    Without a fixed id every attempt of a preempted run opened a new W&B run under the same name. A fresh
    start (step 0: resume=none, or no checkpoint yet) drops the directory's earlier metrics.jsonl records,
    and likewise starts a new W&B run instead of mixing its steps into the earlier one's."""
    path = run_dir / WANDB_ID_FILE
    if continuing and path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    run_id = secrets.token_hex(4)  # W&B ids: 8 lower-case letters/digits, as its own
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


ONLINE_INIT_TIMEOUT_S = 20.0  # how long an online W&B start may wait for the server before logging offline


def _start_wandb(run_dir: Path, mode: str, project: str, tags: list[str], config: dict[str, Any],
                 run_name: str | None, run_id: str):
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        print("[metrics] wandb online requested but WANDB_API_KEY is unset: logging offline instead", flush=True)
        mode = "offline"
    import wandb  # lazy: importing wandb costs ~1.5 s and is only needed on rank 0

    # resume="allow" with the run's own id: online, a resumed attempt continues that W&B run (its rows go on,
    # each with its training step: _use_training_step_axis); offline (wandb 0.31 does not resume locally),
    # each attempt writes offline-run-<time>-<id> with the same id, for `wandb sync <run dir>/wandb`
    def init(mode: str, **settings):
        return wandb.init(project=project, tags=tags, config=config, dir=str(run_dir), mode=mode,
                          name=run_name or run_dir.name, id=run_id, resume="allow",
                          settings=wandb.Settings(silent=True, console="off", **settings))

    run = None
    if mode == "online":
        # with a key but no reachable server (a compute node without internet access) wandb.init waited 90 s
        # and then raised, ending the run: wait at most ONLINE_INIT_TIMEOUT_S (or $WANDB_INIT_TIMEOUT), then log
        # offline (`wandb sync <run dir>/wandb` uploads it later)
        timeout = {} if os.environ.get("WANDB_INIT_TIMEOUT") else {"init_timeout": ONLINE_INIT_TIMEOUT_S}
        try:
            run = init("online", **timeout)
        except Exception as exc:  # noqa: BLE001 - CommError, timeouts, auth errors: tracking must not stop training
            why = (str(exc).splitlines() or [""])[0]
            print(f"[metrics] wandb online failed ({type(exc).__name__}: {why}): logging offline instead", flush=True)
            wandb.teardown()  # the failed attempt still holds the run id in wandb's service process
    if run is None:
        run = init("offline" if mode == "online" else mode)
    return _use_training_step_axis(run)


STEP_KEY = "step"  # the record's own training step, the x axis of every W&B chart


def _use_training_step_axis(run):
    """Plot every metric against the training step ``STEP_KEY`` that each row carries, and let W&B number
    its rows (``_step``) itself.

    With ``wandb.log(..., step=n)`` a resumed run lost the steps it ran again: an attempt killed after step
    S+k resumes from the step-S checkpoint and logs S+1..S+k anew (the steps that made the final weights),
    but the W&B run it resumes is already at step S+k, and W&B drops (with a warning) every row whose step
    is below the run's. W&B's own rewind (``resume_from``) is a private preview; this is the public way
    (as Lightning's WandbLogger does): rows are always accepted, charts use the training step, and a step
    logged twice shows both values at that step."""
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
    return run


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plotted_records(rows: list[dict]) -> list[dict]:
    """The records loss.png draws: a validation after a max_steps stop off the schedule (tracked: false) only
    where the file ends with it (the run ended there); in a continued run's history it is a point the
    uninterrupted run never made."""
    last_val = max((i for i, r in enumerate(rows) if r.get("kind") == "validation"), default=None)
    return [r for i, r in enumerate(rows) if r.get("tracked", True) or i == last_val]


def plot_losses(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Training and validation loss curves against the step."""
    if not Path(metrics_path).is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plotted_records(read_metrics(metrics_path))
    fig, ax = plt.subplots(figsize=(7, 4))
    # elbo_train (the epoch's mean over its training cells) next to elbo_validation: the same quantity, so a
    # gap opening between them is over-fitting
    for key, kind in (("loss", "train"), ("elbo_train", "train_epoch"), ("reconstruction_loss_validation", "validation"),
                      ("elbo_validation", "validation")):
        pts = [(r["step"], r[key]) for r in rows if key in r and r.get("kind") == kind]
        if pts:
            xs, ys = zip(*pts, strict=True)
            # a single point needs a marker: a line through one point draws nothing
            ax.plot(xs, ys, marker="o" if kind != "train" or len(xs) == 1 else None, label=key)
    # optim.reduce_lr_on_plateau: where the rate came down (a bend in the curves there is the new rate)
    rates = [(r["step"], r["lr"]) for r in rows if r.get("kind") == "validation" and "lr" in r]
    lowered = [step for (_, before), (step, after) in pairwise(rates) if after < before]
    for k, step in enumerate(lowered):
        ax.axvline(step, color="grey", linestyle=":", linewidth=1, label="learning rate lowered" if k == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per cell")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
