"""Checks that refuse a checkpoint before or while it is loaded (``trainer/checkpoint.py`` loads it).

Two kinds, each failing with one :class:`CheckpointError` line that names the file and the way out:
  * safe and intact: no symbolic link, every ``*.pt`` with its torch CRCs intact and no pickled global
    beyond torch's tensor allow-list (nothing is unpickled before these pass), ``safe_load`` (a
    weights-only ``torch.load`` that yields a dict or one line), the keys a reader needs;
  * fits this run: the same world size, the same store (data fingerprint); a changed torch thread count
    or code (code fingerprint) is only said, because the run still continues, just not bit for bit.
The settings that must match (``config``) are checked in ``trainer/resume_settings.py``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainer import dist

# DeepSpeed's ZeRO optimizer files pickle these plain classes and DeepSpeed loads them with
# weights_only=False; they are allowed by exact name (constructing them runs no user code), anything
# else in any file of a checkpoint is refused before DeepSpeed or torch unpickles it.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, ...) or is not safe / not valid to load."""


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


def check_files(path: Path) -> None:
    """Refuse a checkpoint directory holding a symbolic link, or any ``*.pt`` file that is damaged or
    carries pickled objects: before anything in it is unpickled (the backend wrapper loads the weights
    files after ``load_states``, DeepSpeed's not weights-only)."""
    for f in path.rglob("*"):
        # rglob does not enter a symlinked directory: a link could carry a file past the pickle check
        # into DeepSpeed's own (not weights-only) loader. Checkpoints are written as plain files.
        if f.is_symlink():
            raise CheckpointError(f"checkpoint {path} contains a symbolic link ({f}); refusing to load it")
    for f in sorted(path.rglob("*.pt")):
        check_intact(f, path)  # first: a damaged pickle would otherwise be reported as a refused global
        check_pickle_free(f)


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


def check_world_size(trainer_state: dict[str, Any], path: Path, world_size: int) -> None:
    """Refuse a checkpoint written by a different world size: the stream positions and ZeRO shards are
    per rank."""
    saved_world = int(trainer_state["world_size"])
    if saved_world != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {saved_world} processes but this run has "
                              f"{world_size}; resume with the same number of processes")


def check_weights_dtype(trainer_state: dict[str, Any], path: Path, dtype: torch.dtype) -> None:
    """Refuse a checkpoint whose weights were trained in another dtype: DeepSpeed with dist.precision=bf16 trains
    bf16 weights on a GPU or a native-bf16 CPU and fp32 ones elsewhere, with optimizer states of other layouts
    (its bf16 optimizer keeps fp32 masters), so the same config resumed on the other kind of machine failed
    inside DeepSpeed's loader. Checkpoints written before this was recorded are not checked."""
    saved = trainer_state.get("weights_dtype")
    if saved is not None and saved != str(dtype):
        raise CheckpointError(f"checkpoint {path} holds {saved.removeprefix('torch.')} weights but this run trains "
                              f"{str(dtype).removeprefix('torch.')} ones here (DeepSpeed with dist.precision=bf16 "
                              f"trains bf16 only on a GPU or a CPU with native bf16): resume it on such a machine")


def data_fingerprint(meta) -> str:
    """Hash of what the model's shape and meaning depend on: feature names, batch and covariate
    categories. Stored in every checkpoint so a resume on another store is refused by name."""
    h = hashlib.blake2b(digest_size=16)
    for part in (meta.gene_names, meta.region_names, meta.batch_categories, meta.cat_cov_keys,
                 [meta.cat_cov_categories[k] for k in meta.cat_cov_keys], meta.cont_cov_keys):
        h.update(json.dumps(part).encode())
    return h.hexdigest()


def check_same_data(trainer_state: dict[str, Any], meta, path: str | Path, store: str, cells: str) -> None:
    """Refuse to resume a checkpoint trained on a store with other features/categories, or on other cells
    (``cells``: ``data.cell_table.cells_fingerprint`` of this run's store; a store of other cells with the same
    features and batch names, e.g. a new dataset trained into the default run.output_dir, continued the old
    run on it without a word)."""
    saved = trainer_state.get("data_fingerprint")
    if saved is not None and saved != data_fingerprint(meta):
        raise CheckpointError(f"checkpoint {path} was trained on a store with other features or categories "
                              f"than data.store={store} ({meta.n_genes} genes, {meta.n_regions} regions, "
                              f"batches {meta.batch_categories[:3]}...); use the same store or a new run.output_dir")
    saved = trainer_state.get("cells_fingerprint")  # absent in checkpoints written before it was recorded
    if saved is not None and saved != cells:
        raise CheckpointError(f"checkpoint {path} was trained on other cells than data.store={store} holds "
                              f"({meta.n_cells} cells; the same features and categories, but other cells or another "
                              "order): use the same store, or a new run.output_dir for a new run")


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


def warn_if_threads_differ(state: dict, path: str) -> None:
    """Resume is bit-exact only with the thread count the checkpoint was written with: the CPU kernels
    split their reductions by intra-op thread (measured: 1 vs 2 threads end 7e-8 apart after 15 steps of
    a tiny run, each count bit-reproducible), so a changed count is said instead of showing up as noise."""
    saved = state.get("torch_threads")  # absent in checkpoints written before it was recorded
    if saved is not None and int(saved) != torch.get_num_threads():
        dist.print0(f"[train] warning: {path} was written with {int(saved)} torch threads, this run uses "
                    f"{torch.get_num_threads()} (OMP_NUM_THREADS / torch.set_num_threads): the run continues, "
                    f"but not bit for bit as the uninterrupted run would have")
