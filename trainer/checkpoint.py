"""Atomic, pickle-free checkpoints that resume a run exactly: writing, finding and loading them.

Layout: ``<run>/checkpoints/step_000000123/`` holding
  * ``trainer.pt``  (rank 0): epoch, step, resolved config as a JSON string, world size, loop state
    (early-stopping, guard counters, metrics so far);
  * ``rank_<r>.pt`` (every rank): its RNG states (torch, numpy, python) and its StoreStream position;
  * the weights and both optimizers, written by the backend wrapper (``trainer/parallel.py``):
    ``model.pt`` for DDP, DeepSpeed's own (possibly ZeRO-sharded) files for DeepSpeed.
Every rank writes into ``.tmp_step_...``; after a barrier rank 0 renames it, so a directory with a
final name is always complete (a SIGKILL leaves only a ``.tmp`` that ``resume=auto`` ignores).
Everything is loadable with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists.
Also here, because they decide what a resume may find: ``best/model.safetensors`` (keep=best; it also
travels inside ``trainer.pt``) and the refusal of older checkpoints that pruning would let outlive a run.
What refuses a checkpoint on load (damaged, pickled objects, other world size or store), the checked
``safe_load`` of one file, and the notes on resume (thread count, code) are in
``trainer/checkpoint_checks.py``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.typed_config import ConfigError
from trainer import dist
from trainer.checkpoint_checks import CheckpointError, check_files, check_world_size, require_keys, safe_load

PREFIX = "step_"
TMP_PREFIX = ".tmp_step_"


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """RNG states as tensors/ints (numpy's key array converted to a tensor: no pickled ndarray)."""
    _kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
        "python_version": int(version), "python_state": list(py_state), "python_gauss": gauss,
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    random.setstate((state["python_version"], tuple(state["python_state"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _RecordingWriter:
    """File wrapper that remembers the OSError of a failed write: torch.save turns it into an opaque
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``; we re-raise the real one."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_file(obj: Any, path: Path) -> None:
    # fsync before the directory rename so a crash cannot leave a renamed dir with a truncated file.
    with open(path, "wb") as fh:
        rec = _RecordingWriter(fh)
        try:
            torch.save(obj, rec)
        except RuntimeError:
            if rec.error is not None:
                raise rec.error from None
            raise
        fh.flush()
        os.fsync(fh.fileno())


def _write_failure(exc: BaseException, directory: Path) -> str | None:
    """A one-line cause for a failed checkpoint write, or None if ``exc`` is not a write failure.

    torch.save given a path (the backend wrappers' model files) reports a short write (disk full,
    quota) only as ``RuntimeError ... unexpected pos``; the free space tells the user what happened."""
    try:
        st = os.statvfs(directory if directory.exists() else directory.parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = -1
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename or directory})"
    text = str(exc)
    if "unexpected pos" in text or "PytorchStreamWriter" in text or "file write failed" in text:
        hint = "No space left on device" if 0 <= free < 1 << 20 else "short write (I/O error or quota?)"
        return f"{hint}: torch could not write under {directory} ({free} bytes free; {text.splitlines()[0]})"
    return None


def save_checkpoint(run_dir: str | Path, step: int, trainer_state: dict[str, Any],
                    rank_state: dict[str, Any], wrapper, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    A failed write (disk full, quota, I/O error) removes the partial ``.tmp`` directory and raises
    :class:`CheckpointError` naming the cause and the newest complete checkpoint, which is untouched:
    older checkpoints are pruned only after the new one is complete and renamed."""
    root = checkpoints_root(run_dir)
    tmp, final = root / f"{TMP_PREFIX}{step:09d}", root / f"{PREFIX}{step:09d}"
    rank = dist.get_rank()
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        wrapper.save(tmp)
        _fault_pause(tmp)
        save_file(rank_state, tmp / f"rank_{rank}.pt")
        if rank == 0:
            save_file(trainer_state, tmp / "trainer.pt")
    except (OSError, RuntimeError) as exc:
        cause = _write_failure(exc, tmp)
        if cause is None:  # not a write failure: a real bug, keep its traceback
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial write took
        done = complete_checkpoints(run_dir)
        kept = f"the newest complete checkpoint {done[-1]} is intact" if done else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint step {step} under {root}: {cause}; {kept}") from None
    dist.barrier()
    if rank == 0:
        if final.exists():  # same step saved twice (e.g. end of epoch == interval): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    dist.barrier()
    return final


def _fault_pause(tmp: Path) -> None:
    """Test hook (fault injection, tests/test_reliability_checkpoint.py): with
    ``MVA_FAULT_PAUSE_CHECKPOINT=N`` the N-th checkpoint write of this process stops half-written
    (weights saved, trainer state not yet) and sleeps, so a test can SIGKILL it there for real."""
    target = os.environ.get("MVA_FAULT_PAUSE_CHECKPOINT")
    if not target:
        return
    _fault_pause.count = getattr(_fault_pause, "count", 0) + 1
    if _fault_pause.count == int(target):
        print(f"[fault] paused in checkpoint write {tmp}", flush=True)
        time.sleep(3600)


def _prune(root: Path, keep: int) -> None:
    done = complete_checkpoints(root.parent)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (by the step number in the name, also past 9 digits).

    Only ``step_<digits>`` is one of ours: a copy kept beside it (``step_000000010.bak``) sorted after the
    original, so resume=auto loaded it and pruning deleted it, and its name crashed ``step_of``."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir()
                   if p.is_dir() and re.fullmatch(f"{PREFIX}[0-9]+", p.name) and (p / "trainer.pt").is_file()),
                  key=step_of)


def step_of(checkpoint_dir: str | Path) -> int:
    """The step number in a checkpoint directory's name (``step_<n>``)."""
    return int(Path(checkpoint_dir).name[len(PREFIX):])


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """``auto``: newest complete checkpoint of this run (or None); ``none``: None; else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / "trainer.pt").is_file():
        # a word that is no path (run.resume=latest) gets the values run.resume takes
        what = "is not a complete checkpoint directory (no trainer.pt)" if path.exists() or "/" in resume else \
            "names no checkpoint directory"
        raise FileNotFoundError(f"run.resume={resume!r} {what}: give auto (the newest of run.output_dir), none (a "
                                "fresh start) or a checkpoint directory (<run>/checkpoints/step_N)")
    return path


def load_states(path: str | Path, rank: int, world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state, this rank's state); refuses a checkpoint written by a different world size,
    because the stream positions and ZeRO shards are per rank, and refuses any file of the checkpoint
    directory that carries pickled objects (the backend wrapper loads the weights files next)."""
    path = Path(path)
    check_files(path)  # symbolic links, damaged files, pickled objects: before anything is unpickled
    trainer_state = require_keys(safe_load(path / "trainer.pt"), ("world_size",), path / "trainer.pt")
    check_world_size(trainer_state, path, world_size)
    rank_state = safe_load(path / f"rank_{rank}.pt")
    return trainer_state, rank_state


BEST_FILE = Path("best") / "model.safetensors"


def write_best(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    """best/model.safetensors, atomically: a kill mid-write must not leave a truncated file that a later
    export would load."""
    from safetensors.torch import save_file

    final = run_dir / BEST_FILE
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(".model.safetensors.tmp")
    save_file(weights, str(tmp))
    os.replace(tmp, final)


def restore_best(run_dir: Path, weights: dict[str, torch.Tensor] | None) -> None:
    """best/ as a checkpoint recorded it: its weights, or no file ({}: no best yet, or a fresh start).
    None (a checkpoint written before the best weights were recorded) leaves the file as it is."""
    if weights is None:
        return
    if weights:
        write_best(run_dir, weights)
    else:
        (run_dir / BEST_FILE).unlink(missing_ok=True)


def read_best(run_dir: Path) -> dict[str, torch.Tensor]:
    """The best weights so far ({} when there are none yet)."""
    from safetensors.torch import load_file

    f = run_dir / BEST_FILE
    return load_file(str(f)) if f.is_file() else {}


def refuse_newer_checkpoints(run_dir: str | Path, resume: str, step: int) -> None:
    """Collective. Pruning keeps the highest step numbers (``_prune``), so checkpoints of ``run_dir`` beyond
    the step this run starts from -- an earlier run's under ``resume=none``, the abandoned trajectory when
    rolling back to an older checkpoint -- would outlive this run's own, which would be deleted as they
    are written, and a later ``resume=auto`` would load them. Refused, naming the way out."""
    newer = dist.broadcast_object([str(c) for c in complete_checkpoints(run_dir) if step_of(c) > step])
    if not newer:
        return
    if resume == "none":
        raise ConfigError(f"run.resume=none, but run.output_dir={run_dir} already holds checkpoints of an "
                          f"earlier run (newest: {newer[-1]}): use run.resume=auto to continue that run, or another "
                          f"run.output_dir (or delete {checkpoints_root(run_dir)}) to start afresh")
    raise ConfigError(f"run.resume={resume} (step {step}) but {run_dir} holds newer checkpoints "
                      f"({len(newer)}, newest {newer[-1]}): move or delete them to roll back, or "
                      "resume into another run.output_dir")
