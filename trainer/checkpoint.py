"""Atomic, pickle-free checkpoints that resume a run exactly.

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
travels inside ``trainer.pt``), the refusal of older checkpoints that pruning would let outlive a run,
and the thread-count note on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.typed_config import ConfigError
from trainer import dist

PREFIX = "step_"
TMP_PREFIX = ".tmp_step_"


# DeepSpeed's ZeRO optimizer files pickle these plain classes and DeepSpeed loads them with
# weights_only=False; they are allowed by exact name (constructing them runs no user code), anything
# else in any file of a checkpoint is refused before DeepSpeed or torch unpickles it.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, ...) or is not safe / not valid to load."""


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
        raise FileNotFoundError(f"run.resume={resume!r} is not a complete checkpoint directory (no trainer.pt)")
    return path


def data_fingerprint(meta) -> str:
    """Hash of what the model's shape and meaning depend on: feature names, batch and covariate
    categories. Stored in every checkpoint so a resume on another store is refused by name."""
    h = hashlib.blake2b(digest_size=16)
    for part in (meta.gene_names, meta.region_names, meta.batch_categories, meta.cat_cov_keys,
                 [meta.cat_cov_categories[k] for k in meta.cat_cov_keys], meta.cont_cov_keys):
        h.update(json.dumps(part).encode())
    return h.hexdigest()


def code_fingerprint() -> str:
    """Hash of torch's version and of the source files of the ``trainer`` and ``data`` packages (their
    top level: model, step, loop, loader; not the inference jobs or the quality harness). Stored in every
    checkpoint: a resume is bit-exact only with the same code (a same-math refactor of a kernel moves
    the weights by ~1e-7 after tens of steps), so a resume by other code is said in one line instead of
    showing up later as an unexplained difference. The same files in every process, whatever it imported."""
    h = hashlib.blake2b(torch.__version__.encode(), digest_size=16)
    for package in ("trainer", "data"):
        for f in sorted((Path(__file__).resolve().parent.parent / package).glob("*.py")):
            h.update(f"{package}/{f.name}".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def check_same_data(trainer_state: dict[str, Any], meta, path: str | Path, store: str) -> None:
    """Refuse to resume a checkpoint trained on a store with other features/categories."""
    saved = trainer_state.get("data_fingerprint")
    if saved is not None and saved != data_fingerprint(meta):
        raise CheckpointError(f"checkpoint {path} was trained on a store with other features or categories "
                              f"than data.store={store} ({meta.n_genes} genes, {meta.n_regions} regions, "
                              f"batches {meta.batch_categories[:3]}...); use the same store or a new run.output_dir")


def check_pickle_free(path: str | Path) -> None:
    """Refuse a checkpoint file whose pickle names any global beyond torch's tensor allow-list.

    Reads only the pickle opcodes (nothing is executed, the tensors are not loaded); the real load
    then uses ``weights_only=True`` as a second line of defence. A downloaded or tampered checkpoint
    carrying e.g. an object with ``__reduce__`` is therefore refused before any code could run."""
    path = Path(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as exc:  # not a torch zip, truncated
        raise CheckpointError(f"checkpoint file {path} is not a readable torch file: {exc}") from None
    unsafe = [g for g in unsafe if g not in DEEPSPEED_GLOBALS]
    if unsafe:
        raise CheckpointError(f"checkpoint file {path} contains pickled Python objects ({', '.join(unsafe[:3])}); "
                              f"refusing to load it (checkpoints hold only tensors, numbers and strings)")


def check_intact(path: str | Path, checkpoint: str | Path | None = None) -> None:
    """Refuse a checkpoint file whose bytes changed after torch wrote them.

    torch.save stores a CRC-32 of every record of its zip file (tensors, the pickle), but torch.load
    never checks them: a flipped bit in a stored weight, or in a pickled number such as the step, resumed
    silently with other values. Reading the records back through ``zipfile`` checks every CRC (one pass
    over the bytes, ~1 s per GB). A record with CRC 0 was written with torch's ``compute_crc32`` off and
    has nothing to check; such files, and every checkpoint written before this check, load as before.
    ``checkpoint``: the checkpoint directory holding the file, named as the one to delete."""
    path = Path(path)
    where = Path(checkpoint) if checkpoint is not None else path.parent
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0:
                    continue
                with z.open(info) as fh:  # raises BadZipFile at the end of a record whose CRC differs
                    while fh.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path} is damaged ({exc}; its bytes changed after it was "
                              f"written: disk, copy or transfer error): delete {where} and resume from "
                              "the previous checkpoint (run.resume=auto takes the newest complete one left)") from None


def safe_load(path: str | Path) -> Any:
    """``torch.load`` of a checkpoint file that can only yield tensors and plain containers."""
    check_pickle_free(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint file {path} refused by the weights-only loader: "
                              f"{str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # a damaged zip (a missing tensor record)
        raise CheckpointError(f"checkpoint file {path} is damaged: {str(exc).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(obj).__name__}, not a dict of states")
    return obj


def require_keys(state: dict[str, Any], keys: tuple[str, ...], path: str | Path) -> dict[str, Any]:
    """``state`` if it has every key; a one-line CheckpointError naming the first missing one otherwise."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint file {path} lacks {missing[0]!r} (written by other code, or damaged)")
    return state


def load_states(path: str | Path, rank: int, world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state, this rank's state); refuses a checkpoint written by a different world size,
    because the stream positions and ZeRO shards are per rank, and refuses any file of the checkpoint
    directory that carries pickled objects (the backend wrapper loads the weights files next)."""
    path = Path(path)
    for f in path.rglob("*"):
        # rglob does not enter a symlinked directory: a link could carry a file past the pickle check
        # into DeepSpeed's own (not weights-only) loader. Checkpoints are written as plain files.
        if f.is_symlink():
            raise CheckpointError(f"checkpoint {path} contains a symbolic link ({f}); refusing to load it")
    for f in sorted(path.rglob("*.pt")):
        check_intact(f, path)  # first: a damaged pickle would otherwise be reported as a refused global
        check_pickle_free(f)
    trainer_state = require_keys(safe_load(path / "trainer.pt"), ("world_size",), path / "trainer.pt")
    saved_world = int(trainer_state["world_size"])
    if saved_world != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {saved_world} processes but this run has "
                              f"{world_size}; resume with the same number of processes")
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


def warn_if_threads_differ(state: dict, path: str) -> None:
    """Resume is bit-exact only with the thread count the checkpoint was written with: the CPU kernels
    split their reductions by intra-op thread (measured: 1 vs 2 threads end 7e-8 apart after 15 steps of
    a tiny run, each count bit-reproducible), so a changed count is said instead of showing up as noise."""
    saved = state.get("torch_threads")  # absent in checkpoints written before it was recorded
    if saved is not None and int(saved) != torch.get_num_threads():
        dist.print0(f"[train] warning: {path} was written with {int(saved)} torch threads, this run uses "
                    f"{torch.get_num_threads()} (OMP_NUM_THREADS / torch.set_num_threads): the run continues, "
                    f"but not bit for bit as the uninterrupted run would have")


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
