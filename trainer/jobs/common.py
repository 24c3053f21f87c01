"""What every inference job shares: resolving the model, checking the store against it, checking the
job options (feature subsets, transform_batch, dtype), the chunk bookkeeping that makes a job
restartable, and how output arrays are laid out (chunking, compression, consolidation).

Output chunks are fixed global row ranges ``[k * rows, (k + 1) * rows)``, independent of the world
size; rank ``r`` takes a contiguous block of chunk ids, so ranks write disjoint rows (and disjoint
Zarr chunks: the output arrays are chunked by the same rows). A chunk is recorded as done by an empty
marker file written only after its rows are stored, so a rerun after a crash redoes at most the
chunks that were in flight, with any world size.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import zarr

from data.cell_table import cells_fingerprint
from data.manifest import manifest_digest
from data.reference_features import find_model_dir, not_a_model
from data.store import Store, StoreError, open_store
from trainer import dist
from trainer.export import (
    INFO,
    TRAINING_STORE,
    WEIGHTS,
    imported_size_factor_columns,
    training_atac_library_max,
)


class InferError(ValueError):
    """Bad input to an inference job (model, store, output); the message is one line."""


def resolve_model_dir(path: str | os.PathLike, key: str = "model_dir") -> Path:
    """An exported model directory, given either it or a training run directory (which holds model/); ``key``:
    the setting that named it (the error says what to give it instead)."""
    p = Path(path)
    d = find_model_dir(p)
    if d is not None:
        return d
    if not p.exists():
        raise InferError(f"model directory {p} does not exist")
    why = not_a_model(p, key)  # a checkpoint, or a scvi-tools model (trainer.api.load reads those; jobs need ours)
    if why:
        raise InferError(why)
    raise InferError(f"{p} is neither an exported model ({WEIGHTS} + {INFO}) nor a run directory with model/ "
                     f"(did training finish?)")


def open_checked_store(path: str | os.PathLike, info: dict) -> Store:
    """Open the store and refuse it unless its features and categories are the model's."""
    try:
        store = open_store(path)
    except StoreError as exc:
        raise InferError(str(exc)) from None
    m = store.meta
    why = data_mismatch(m, info)
    if why:
        raise InferError(f"store {store.path} {why} (rebuild it with mva-build ... features_from=<this model>)")
    code_maps(m, info)  # refuses categories the model never saw
    args = info.get("model_args", {})
    if args.get("modality_weights") == "cell":
        # per-cell weights are rows of a table indexed by training cell: another store's cells would read
        # other cells' weights, or past the table's end (the reference refuses any data but its own). The cell
        # count alone let a rebuild of the same cells in another order (preshuffle) through: every paired cell
        # then read another cell's weights
        trained = (info.get(TRAINING_STORE) or {}).get("cells_fingerprint")
        if m.n_cells != args.get("n_obs") or (trained is not None and cells_fingerprint(store) != trained):
            raise InferError(f"the model learned per-cell modality weights (modality_weights=cell) for its "
                             f"{args.get('n_obs')} training cells: it only applies to its training store (the same "
                             f"cells on the same rows), and {store.path} has {m.n_cells} cells"
                             + (", other ones or in another order" if m.n_cells == args.get("n_obs") else ""))
    return store


def data_mismatch(meta, info: dict) -> str | None:
    """Why a store with ``meta`` is not readable by the model described by ``info`` (its features, in order,
    and its covariate columns), as the end of a sentence starting with the store; None when it is."""
    for what, ours, theirs in (("genes", meta.gene_names, info["gene_names"]),
                               ("regions", meta.region_names, info["region_names"])):
        if list(ours) != list(theirs):
            # say which: "900 names differ" (the symmetric difference of 300 and 600) told a user nothing
            have, known = set(ours), set(theirs)
            missing = [n for n in theirs if n not in have]
            extra = [n for n in ours if n not in known]
            how = "; ".join([f"{len(missing)} of the model's missing, e.g. {missing[:3]}"] * bool(missing)
                            + [f"{len(extra)} not the model's, e.g. {extra[:3]}"] * bool(extra)) \
                or "the same names in another order"
            return (f"has {len(ours)} {what} but the model was trained on {len(theirs)} ({how}): the store must "
                    "have the model's features in the model's order")
    if list(meta.cat_cov_keys) != list(info["cat_cov_keys"]) or list(meta.cont_cov_keys) != list(info["cont_cov_keys"]):
        return (f"has covariates ({list(meta.cat_cov_keys)}, {list(meta.cont_cov_keys)}), the model "
                f"({info['cat_cov_keys']}, {info['cont_cov_keys']})")
    return None


def _code_map(ours: list[str], theirs: list[str], what: str) -> np.ndarray | None:
    """Store code -> model code (None when the lists are equal); an error naming categories not the model's."""
    if list(ours) == list(theirs):
        return None
    pos = {c: i for i, c in enumerate(theirs)}
    new = [c for c in ours if c not in pos]
    if new:
        raise InferError(f"store {what} {new[:5]} are not among the model's {list(theirs)[:10]}: the model has no "
                         "embedding for them (train a query model: mva-train query.reference=<this model>, README \"Query mapping\")")
    return np.array([pos[c] for c in ours], dtype=np.int64)


def code_maps(meta, info: dict) -> tuple[np.ndarray | None, list[np.ndarray | None]]:
    """Lookup tables from the store's batch / categorical-covariate codes to the model's, for a store whose
    categories are some of the model's in another numbering (a store built from part of the data, e.g. one
    donor: its batch list is shorter); None where the lists are equal."""
    batch = _code_map(meta.batch_categories, info["batch_categories"], "batches")
    covs = [_code_map(meta.cat_cov_categories[k], info["cat_cov_categories"][k], f"{k} categories")
            for k in meta.cat_cov_keys]
    return batch, covs


def inference_stream(store: Store, module, info: dict, **kw):
    """A StoreStream over ``store`` whose batches carry the model's category codes (see :func:`code_maps`) and
    the size factors the module reads."""
    from data.stream import StoreStream

    imported = imported_size_factor_columns(info)
    if imported and dist.get_rank() == 0:
        warnings.warn(f"the model was trained with size factors from obs columns {imported} (scvi-tools' "
                      "size_factor_key), which a store does not carry: each cell's RNA total and ATAC total over the "
                      "store's largest stand in for them, in every output that uses the library (library_size="
                      "'observed', normalize_cells, elbo; not the latents). For the model's own factors use "
                      "trainer.api with an AnnData/MuData holding those columns", stacklevel=2)
    stream = StoreStream(store, size_factor=module.use_size_factor, **kw)
    stream.recode(*code_maps(store.meta, info))
    trained_max = training_atac_library_max(info)
    if module.use_size_factor and trained_max is not None:
        # the model's own scale: this store's largest ATAC total made a cell's values depend on which other
        # cells the store holds (a store without the training's largest cell moved every ATAC cell by 23 %)
        stream.table.atac_library_max = trained_max
    if dist.is_distributed():
        # every rank writes its part of one output from its own store and model_dir paths: node-local copies
        # of another build or another training would mix two of them in one output
        m = store.meta
        weights = sum(float(t.double().sum()) for t in module.state_dict().values() if t.is_floating_point())
        dist.check_same_everywhere(f"{manifest_digest(store.path)}:{m.n_cells}:{m.batch_categories}:"
                                   f"{m.cat_cov_categories}:{weights!r}", f"store ({store.path}) or model_dir",
                                   "another build of the store or other model weights")
    return stream


def store_identity(store: Store) -> dict:
    """Where a store is and which build it is (``Store.identity``: every build, also one in place, writes a
    new root zarr.json), for a resume fingerprint: a rebuilt store is not the one an unfinished output's
    chunks were computed on."""
    return {"store": str(Path(store.path).resolve()), "store_identity": list(store.identity or ())}


def chunk_ranges(n_cells: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, n_cells)) for s in range(0, n_cells, rows)]


def my_chunks(n_chunks: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous block of chunk ids (blocks concatenate in order over ranks)."""
    base, extra = divmod(n_chunks, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key (old -> new)`` for every differing setting, into sections (it named only the section: a changed
    ``expression.library_size`` read as "different settings (['expression'])")."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({_short(a)} -> {_short(b)})")
    return out


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class Progress:
    """Done markers of one job's output: ``<dir>/chunk-<k>.done``, plus the job's fingerprint."""

    def __init__(self, directory: Path):
        self.dir = directory

    def saved(self) -> dict | None:
        """The settings the directory was started with (None: not started)."""
        f = self.dir / "job.json"
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as exc:  # never taken as "not started": its done markers would count
            raise InferError(f"{f} cannot be read ({exc}): rerun with overwrite=true to start over") from None

    def refuse_other_settings(self, fingerprint: dict) -> None:
        """Raise InferError naming each setting that differs from the saved ones (nothing saved: nothing to say)."""
        old, fingerprint = self.saved(), json.loads(json.dumps(fingerprint))  # as it reads back: tuples -> lists
        if old is not None and old != fingerprint:
            changed = _differences(old, fingerprint)
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            raise InferError(f"an unfinished output from different settings ({', '.join(changed[:6])}{more}) is "
                             f"in {self.dir}; rerun with its settings to finish it, or with overwrite=true to start over")

    def same_settings(self, fingerprint: dict) -> bool:
        try:
            return self.saved() == json.loads(json.dumps(fingerprint))
        except InferError:
            return False

    def start(self, fingerprint: dict) -> None:
        """Create the directory, or check that an existing one belongs to the same job settings."""
        self.refuse_other_settings(fingerprint)
        if self.saved() is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "job.json").write_text(json.dumps(json.loads(json.dumps(fingerprint)), indent=1, sort_keys=True))

    def is_done(self, k: int) -> bool:
        return (self.dir / f"chunk-{k:07d}.done").is_file()

    def mark_done(self, k: int) -> None:
        (self.dir / f"chunk-{k:07d}.done").touch()

    def n_done(self) -> int:
        return sum(1 for _ in self.dir.glob("chunk-*.done"))


def select_features(wanted: list[str] | None, names: list[str], what: str) -> tuple[list[int] | None, list[str]]:
    """(column indices in the given order or None for all, the output's feature names).

    Unknown or repeated names are refused with the first few named (var_names must be unique)."""
    names = list(names)
    if wanted is None:
        return None, names
    wanted = [str(w) for w in wanted]
    if not wanted:
        raise InferError(f"the {what} subset is an empty list (leave it null for all {what}s)")
    pos = {n: i for i, n in enumerate(names)}
    unknown = [w for w in wanted if w not in pos]
    if unknown:
        raise InferError(f"{len(unknown)} unknown {what} name(s) not in the model: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}")
    seen, dup = set(), []
    for w in wanted:
        if w in seen:
            dup.append(w)
        seen.add(w)
    if dup:
        raise InferError(f"{what} name(s) listed more than once: {dup[:10]}")
    return [pos[w] for w in wanted], wanted


def batch_codes(transform_batch, categories: list[str], n_batch: int) -> list[int] | None:
    """``transform_batch`` (None, a label/code, or a list of them) -> batch codes, or None (own batch).

    Strings are batch labels of the model (its batch categories), integers are codes -- except an
    integer whose text is one of the labels: the store keeps every label as text, so a model trained
    on integer donor ids has labels "1", "2", ..., and the command line's ``transform_batch=1`` means
    the batch labelled "1" (as the reference's accessors read it), not the second batch."""
    if transform_batch is None:
        return None
    if isinstance(transform_batch, np.ndarray) and transform_batch.ndim == 0:
        transform_batch = transform_batch.item()
    # a list (any iterable: a pandas Index from the notebook API) of labels/codes is averaged; anything else
    # is one entry, checked below (a float such as 1.5 is refused there, not iterated: a TypeError before)
    listed = isinstance(transform_batch, Iterable) and not isinstance(transform_batch, (str, bytes, Mapping))
    items = list(transform_batch) if listed else [transform_batch]
    if not items:
        raise InferError("transform_batch is an empty list (leave it null for each cell's own batch)")
    cats = [str(c) for c in categories]
    codes = []
    for item in items:
        item = item.item() if isinstance(item, np.generic) else item  # numpy ints and strings as Python's
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise InferError(f"transform_batch entries must be batch labels or integer codes, got {item!r}")
        if isinstance(item, int) and str(item) in cats:
            item = str(item)
        if isinstance(item, str):
            if item not in cats:
                shown = cats[:10] + (["..."] if len(cats) > 10 else [])
                raise InferError(f"unknown batch label {item!r} in transform_batch; the model's batches: {shown}")
            codes.append(cats.index(item))
        else:
            if not 0 <= item < n_batch:
                raise InferError(f"batch code {item} in transform_batch is out of range [0, {n_batch})")
            codes.append(int(item))
    return codes


def check_dtype(dtype: str, allowed: tuple[str, ...], section: str) -> str:
    if dtype not in allowed:
        raise InferError(f"{section}.dtype must be one of {list(allowed)}, got {dtype!r}")
    return dtype


# Bound on (posterior draws x cells x decoded features) per decoder call: S draws of a batch are decoded
# at once, so without it memory would grow with n_samples (25 draws x 1024 cells x 100k regions = 10 GB).
MAX_DECODE_ELEMENTS = 1 << 25


def average_of_draws(decode, n_samples: int, rows: int, width: int):
    """The average over ``n_samples`` posterior draws of ``decode(n)`` (which returns the (B, F) average of
    n draws), computed in groups of draws so one call decodes at most MAX_DECODE_ELEMENTS values
    (``width`` = features one decoder pass produces per cell). One group = exactly ``decode(n_samples)``."""
    per = max(1, MAX_DECODE_ELEMENTS // max(1, rows * width))
    if per >= n_samples:
        return decode(n_samples)
    total, done = None, 0
    while done < n_samples:
        n = min(per, n_samples - done)
        part = decode(n) * n
        total = part if total is None else total + part
        done += n
    return total / n_samples


# Compressor of every output array: blosc lz4 with byte shuffle compresses decoded floats as well as zarr's
# default zstd (27.4 vs 27.6 MB for 32 MB of float32 expression) and writes about 3x faster (measured).
def output_compressors():
    from zarr.codecs import BloscCodec

    return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)


def consolidate(path: Path) -> None:
    with warnings.catch_warnings():
        # zarr warns that v3 consolidated metadata is not in the spec; anndata relies on it all the same
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(str(path))


def create_dense(root: zarr.Group, name: str, shape: tuple[int, ...], dtype, rows: int, cols: int | None = None,
                 fill_value=None, compress: bool = True) -> zarr.Array:
    """An anndata-encoded dense array chunked by output chunk rows (and ``cols`` columns if given);
    ``compress=False``: no compressor (chunk = raw bytes, which ``direct_io.RawChunkWriter`` writes directly)."""
    n = shape[0]
    chunks = [min(rows, max(n, 1)), *shape[1:]]
    if cols is not None and len(shape) > 1:
        chunks[1] = max(1, min(cols, shape[1]))
    arr = root.create_array(name, shape=shape, dtype=dtype, chunks=tuple(chunks), fill_value=fill_value,
                            compressors=output_compressors() if compress else None, overwrite=True)
    arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return arr


# Elements per output chunk of a cells x features X (2M = 8 MiB of float32): chunks are
# ``batch_size`` rows by as many columns as fit, so a 100k-region output is not one huge chunk per row block.
MAX_CHUNK_ELEMENTS = 1 << 21


def feature_chunk_cols(rows: int, n_features: int) -> int:
    return max(1, min(n_features, MAX_CHUNK_ELEMENTS // max(rows, 1)))
