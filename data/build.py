"""mva-build (``python -m data.build``): convert one or several inputs into an atlas store.

``build_store(cfg)`` is the plain function; ``main`` is the Hydra app over ``conf/build.yaml``.
Steps: refuse an existing output -> open every input (obs and feature tables only) -> validate obs,
ids, masks -> align features by name (rule in docs/store.md) -> optional detection filters -> write
the shards: one Dask task per shard (data/dask_build.py; in this process by default, or on a
LocalCluster / an existing cluster with ``dask_scheduler``), or, with ``preshuffle``, one sequential
pass through the out-of-core shuffle into the StoreWriter. Any error removes the temporary output; the
result is renamed into place only when complete.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from data.cli import check_overrides, one_line_errors
from data.config import BuildConfig, InputConfig
from data.convert import open_input
from data.convert.align import align, remap_columns
from data.convert.shuffle import BucketShuffler
from data.dask_build import close_sources, detection_filters, executor, write_shards
from data.filters import apply_filters
from data.reference_features import reference_features, report_padding
from data.store_format import OBS_RESERVED, StoreSchema, check_codec
from data.validate import (
    ValidationError,
    cells_without_modality,
    check_columns,
    check_cont,
    check_counts,
    check_not_empty,
    check_output,
    check_unique,
    check_unmeasured_empty,
    input_columns,
)
from data.writer import StoreWriter

log = logging.getLogger("mva-build")
BATCH_COLUMN = "batch"  # the store's batch column name when batch_key is null (one batch per input)


def _prepare_obs(src, inp: InputConfig, cfg: BuildConfig, batch_key: str) -> pd.DataFrame:
    """Per-cell table of one input with the store's columns (batch, covariates, label, masks)."""
    obs = src.obs
    for mod in ("rna", "atac"):
        if src.features[mod] is None or len(src.features[mod]) == 0:
            # an input without that modality (or an AnnData of it with no features: an ATAC-only file
            # written with an empty gene table) cannot have measured it; True gave cells with empty rows
            # that the model trained on as measured
            obs[f"mask_{mod}"] = False
    used = ([cfg.batch_key] if cfg.batch_key is not None and inp.batch is None else []) + [
        *cfg.cat_cov_keys, *cfg.cont_cov_keys] + ([cfg.label_key] if cfg.label_key is not None else [])
    for col in used:
        check_agree(src, col)
    out = pd.DataFrame(index=obs.index)
    if cfg.batch_key is None or inp.batch is not None:
        out[batch_key] = inp.batch if inp.batch is not None else default_batch_name(src)
    else:
        if cfg.batch_key not in obs.columns:  # data of one sample often has no batch column: name the way out
            raise ValidationError(f"{src.name}: obs has no column {cfg.batch_key!r} (batch_key); available columns: "
                                  f"{input_columns(obs)}; or set batch_key=null for one batch per input "
                                  "(named by inputs[i].batch, else by its file name)")
        check_columns(obs, {cfg.batch_key: "batch_key"}, src.name)
        out[batch_key] = as_text(obs[cfg.batch_key])
    check_columns(obs, {k: "cat_cov_keys" for k in cfg.cat_cov_keys}, src.name)
    check_columns(obs, {k: "cont_cov_keys" for k in cfg.cont_cov_keys}, src.name)
    check_cont(obs, cfg.cont_cov_keys, src.name)
    for k in cfg.cat_cov_keys:
        out[k] = as_text(obs[k])
    for k in cfg.cont_cov_keys:
        out[k] = obs[k].to_numpy(dtype=np.float32)
    if cfg.label_key is not None:
        # Labels are optional per input: an unlabelled input gets "unknown" (NaN), never a fake class.
        out[cfg.label_key] = as_text(obs[cfg.label_key]) if cfg.label_key in obs.columns else None
    out["mask_rna"] = obs["mask_rna"].to_numpy(bool)
    out["mask_atac"] = obs["mask_atac"].to_numpy(bool)
    return out


def check_agree(src, col: str) -> None:
    """Refuse a column whose value for one cell differs between the tables the input's obs was merged from
    (RNA obs, ATAC obs, an .h5mu's global obs): one of them silently won before (the RNA obs for a paired
    cell; the modality obs over the global obs, which is what MuData and scvi-tools read)."""
    parts = [(w, t[col]) for w, t in src.obs_parts if col in t.columns]
    for k, (w1, a) in enumerate(parts):
        for w2, b in parts[k + 1:]:
            common = a.index.intersection(b.index)
            if not len(common):
                continue
            x, y = a.reindex(common), b.reindex(common)
            both = x.notna().to_numpy() & y.notna().to_numpy()
            if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
                # float32 only where a table holds float32 (its float64 copy must agree): integer ids past 2**24
                # are equal in float32 (16777217 == 16777216)
                prec = np.float32 if "float32" in (str(x.dtype).lower(), str(y.dtype).lower()) else np.float64
                diff = both & (x.to_numpy(prec, na_value=np.nan) != y.to_numpy(prec, na_value=np.nan))
            else:
                diff = both & (as_text(x) != as_text(y))
            if diff.any():
                i = int(np.flatnonzero(diff)[0])
                raise ValidationError(f"{src.name}: obs column {col!r} of cell {common[i]!r} is {x.iloc[i]!r} in "
                                      f"{w1} but {y.iloc[i]!r} in {w2} ({int(diff.sum())} cells differ); make them "
                                      "agree (or drop the column from one of them)")


def default_batch_name(src) -> str:
    """The batch of an input without ``batch`` or ``batch_key``: its (first) file name's stem."""
    return Path(src.name.split(" + ")[0]).stem


def _is_float32(v: float) -> bool:
    with np.errstate(over="ignore"):  # beyond float32's range: inf, not equal
        return float(np.float32(v)) == v


def as_text(values: pd.Series) -> np.ndarray:
    """obs values -> category names (object array; None where missing), one rule for every input.

    A categorical maps through its categories; a number that is an integer is written without ".0":
    an int column and the same column upcast to float by a missing value (pandas does that when inputs
    are joined, or through a Parquet round trip) must name the same batch or label, "1" and not "1.0"."""
    s = pd.Series(values).reset_index(drop=True)
    out = np.empty(len(s), dtype=object)
    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = as_text(s.cat.categories.to_series())
        codes = s.cat.codes.to_numpy()
        ok = codes >= 0
        out[ok] = cats[codes[ok]]
        return out
    codes, uniq = pd.factorize(s, use_na_sentinel=True)  # per distinct value, not per cell (1M cells)
    names = np.empty(len(uniq), dtype=object)
    for j, v in enumerate(uniq.to_numpy(dtype=object) if hasattr(uniq, "to_numpy") else uniq):
        if isinstance(v, (float, np.floating)) and float(v).is_integer() and abs(v) < 2**53:  # 1e300: no 301 digits
            v = int(v)
        elif isinstance(v, (float, np.floating)) and _is_float32(float(v)):
            # a float32 number in float32's shortest form: as a Python float 0.1f32 reads "0.10000000149011612",
            # so a float32 column and a float64 one of the same values (two inputs; or one pair's RNA and ATAC
            # obs, which pandas joins as float64) named different batches. Only float32 numbers: 0.1 in float64
            # is not one and prints "0.1" anyway
            v = np.float32(v)
        names[j] = str(v)
    ok = codes >= 0
    out[ok] = names[codes[ok]]
    return out


def _categories(obs_list: list[pd.DataFrame], key: str, keeps: list[np.ndarray]) -> list[str]:
    """Sorted category names of the kept cells (a category only dropped cells had is no category)."""
    vals = set()
    for o, k in zip(obs_list, keeps, strict=True):
        vals.update(str(v) for v in pd.unique(o[key][k].dropna()))
    return sorted(vals)


def build_store(cfg: BuildConfig) -> Path:
    check_output(cfg.out, cfg.overwrite)
    try:
        check_codec(cfg.codec)  # before any input is opened
    except ValueError as exc:
        raise ValidationError(str(exc)) from None
    if not cfg.inputs:
        raise ValidationError("no inputs given (inputs: [...] is empty)")
    if cfg.preshuffle and cfg.dask_scheduler:
        raise ValidationError(f"preshuffle=true runs in one process; unset dask_scheduler={cfg.dask_scheduler!r} "
                              "or preshuffle")
    if cfg.block_size < 1 or cfg.shard_size < 1:
        raise ValidationError(f"block_size and shard_size must be >= 1, got {cfg.block_size} and {cfg.shard_size}")
    batch_col = cfg.batch_key or BATCH_COLUMN
    if batch_col in OBS_RESERVED:  # the store's own column replaced it: a traceback deep in the first shard
        raise ValidationError(f"batch_key {batch_col!r} names one of the store's own obs columns "
                              f"{list(OBS_RESERVED)}: rename it in obs")
    for role, names in (("cat_cov_keys", cfg.cat_cov_keys), ("cont_cov_keys", cfg.cont_cov_keys),
                        ("label_key", [cfg.label_key] if cfg.label_key else [])):
        # the store keeps these as obs columns next to the batch column and its own: a clash would
        # silently overwrite one with the other
        clash = [k for k in names if k == batch_col or k in OBS_RESERVED]
        if clash:
            raise ValidationError(f"{role} {clash} would overwrite the store's own obs column "
                                  f"(batch column {batch_col!r}, reserved {list(OBS_RESERVED)}): rename it in obs")
    inputs = [i if isinstance(i, InputConfig) else InputConfig(**i) for i in cfg.inputs]
    cfg = replace(cfg, inputs=inputs)  # dict inputs (the Python API) typed once, for every step below
    target = reference_features(cfg.features_from)[0] if cfg.features_from else None  # before any input is read
    opened = [open_input(i) for i in inputs]
    try:
        sources, inputs, skipped = _skip_empty(opened, inputs)
        cfg = replace(cfg, inputs=inputs)
        if cfg.preshuffle:  # the out-of-core shuffle is one sequential pass over every cell
            return _build(cfg, sources, apply_filters, None, skipped, target)
        with executor(cfg.dask_scheduler, cfg.dask_workers) as compute:
            filters = partial(detection_filters, compute, inputs)
            return _build(cfg, sources, filters, partial(write_shards, compute, inputs=inputs), skipped, target)
    finally:
        for s in opened:
            s.close()
        close_sources()


def _skip_empty(sources, inputs: list[InputConfig]):
    """Drop the inputs with 0 cells (a sample whose cells were all filtered out upstream), each with a
    warning naming it; refuse a build in which every input is empty. A skipped input takes no part in
    feature_join either: it adds no counts, so under intersection its feature list would only remove
    features from the other inputs' cells, and under union it would only add columns no cell measured."""
    empty = [s.name for s in sources if len(s.obs) == 0]
    if len(empty) == len(sources):
        raise ValidationError(f"{'; '.join(empty)}: no cells in {'this input' if len(empty) == 1 else 'any input'}, "
                              "there is nothing to build")
    for name in empty:
        log.warning("%s: skipped, the input has 0 cells (its features take no part in feature_join)", name)
    kept = [k for k, s in enumerate(sources) if len(s.obs)]
    return [sources[k] for k in kept], [inputs[k] for k in kept], empty


def _where(cfg: BuildConfig) -> str:
    """Where the shards were written, for the summary line (the default path runs Dask tasks in this
    process: calling that "Dask" alone read as if a cluster had been used)."""
    if cfg.preshuffle:
        return "in this process, preshuffled"
    if not cfg.dask_scheduler:
        return "in this process"
    if cfg.dask_scheduler == "local":
        return f"Dask LocalCluster of {cfg.dask_workers} workers"
    return f"Dask cluster {cfg.dask_scheduler}"


def _build(cfg: BuildConfig, sources, filters, write_dask, skipped: list[str], target) -> Path:
    """Validate and align (to ``target``, features_from's names, where given), then write the shards: as Dask
    tasks (``write_dask``) or here, block by block."""
    batch_key = cfg.batch_key or BATCH_COLUMN
    named = [(inp.batch or default_batch_name(src), src.name) for src, inp in zip(sources, cfg.inputs, strict=True)
             if cfg.batch_key is None or inp.batch is not None]
    seen: dict[str, str] = {}
    for name, where in named:
        # every 10x input is called filtered_feature_bc_matrix.h5: samples must not merge by file name
        if name in seen and not any(i.batch == name for i in cfg.inputs):
            raise ValidationError(f"inputs {seen[name]} and {where} would both be batch {name!r} (their file "
                                  "name): give each input its own inputs[i].batch")
        seen.setdefault(name, where)
    if cfg.label_key is not None and not any(cfg.label_key in s.obs.columns for s in sources):
        # one unlabelled input among labelled ones is normal (its labels are unknown); no input having the
        # column is a misspelt label_key, which would silently give a store without a single label
        raise ValidationError(f"no input has the label column {cfg.label_key!r} (label_key); available columns "
                              f"of {sources[0].name}: {input_columns(sources[0].obs)}")
    obs_list, keeps, dropped_cells = [], [], {}
    for src, inp in zip(sources, cfg.inputs):
        for msg in src.warnings:
            log.warning("%s", msg)
        check_not_empty(len(src.obs), {m: 0 if f is None else len(f) for m, f in src.features.items()}, src.name)
        check_unique(src.obs.index, src.name, "cell id")
        obs = _prepare_obs(src, inp, cfg, batch_key)
        keep = cells_without_modality(obs, src.name, cfg.drop_empty_cells)
        if not keep.all():
            dropped_cells[src.name] = int((~keep).sum())
            log.warning("%s: dropped %d cells with neither RNA nor ATAC", src.name, (~keep).sum())
        obs_list.append(obs)
        keeps.append(keep)
    all_ids = pd.Index(np.concatenate([o.index[k].to_numpy() for o, k in zip(obs_list, keeps)]))
    if not all_ids.is_unique:
        dup = all_ids[all_ids.duplicated()][0]
        owners = [s.name for s, o in zip(sources, obs_list) if dup in o.index]
        raise ValidationError(f"cell id {dup!r} appears more than once across inputs ({owners}); "
                              "make ids unique: give each input its own inputs[i].id_prefix (e.g. id_prefix: 'sample1_')")
    if len(all_ids) == 0:
        raise ValidationError("no cells left after dropping cells without any modality")

    measured = [{m: bool(s.obs[f"mask_{m}"].to_numpy(bool).any()) for m in ("rna", "atac")} for s in sources]
    al = align([s.features for s in sources], [s.name for s in sources], cfg.feature_join, measured, target)
    rule = f"features_from={cfg.features_from}" if target is not None else f"{cfg.feature_join} rule"
    for mod, per in al.dropped.items():
        for where, names in per.items():
            if names:
                log.warning("%s: %d %s features not in the aligned set (%s), e.g. %s", where, len(names),
                            mod, rule, names[:5])
    report_padding(al, measured)
    shared = al.names["rna"].intersection(al.names["atac"])
    if len(shared):  # legal (each modality keeps its own table), but usually one input's genes read as peaks
        log.warning("%d feature names are both genes and peaks (e.g. %s): mudata.read_zarr of a shard warns that its "
                    "var names intersect; check that each input's modalities are the ones intended", len(shared),
                    list(shared[:5]))
    filtered = filters(sources, keeps, al, {"rna": cfg.min_gene_fraction, "atac": cfg.min_region_fraction},
                       cfg.block_size)
    schema = StoreSchema(
        gene_names=list(al.names["rna"]), region_names=list(al.names["atac"]), batch_key=batch_key,
        batch_categories=_categories(obs_list, batch_key, keeps), cat_cov_keys=list(cfg.cat_cov_keys),
        cat_cov_categories={k: _categories(obs_list, k, keeps) for k in cfg.cat_cov_keys},
        cont_cov_keys=list(cfg.cont_cov_keys), label_key=cfg.label_key,
        label_categories=_categories(obs_list, cfg.label_key, keeps) if cfg.label_key else [],
        rna_var=al.var["rna"], atac_var=al.var["atac"])
    source = {"kind": "build", "config": _jsonable(asdict(cfg)), "inputs": [s.name for s in sources],
              "dropped_features": {m: {w: {"n": len(v), "first": v[:20]} for w, v in per.items()}
                                   for m, per in al.dropped.items()},
              "filtered_features": {m: {"n": len(v), "first": v[:20]} for m, v in filtered.items()},
              "padded_features": {m: {w: {"n": len(v), "first": v[:20]} for w, v in per.items()}
                                  for m, per in al.padded.items()},
              "dropped_cells": dropped_cells, "skipped_inputs": skipped}
    n_total = len(all_ids)
    G, R = len(al.names["rna"]), len(al.names["atac"])
    for n, what, other in ((G, "genes", "RNA"), (R, "regions", "ATAC")):
        if n == 0:  # mva-train refuses such a store only when it starts; an RNA-only query wants features_from
            log.warning("the store gets 0 %s (no input measures %s): MultiVI trains only on stores with both "
                        "modalities' features; for data of one modality give features_from=<the model>", what, other)
    with StoreWriter(cfg.out, schema, shard_size=cfg.shard_size, overwrite=cfg.overwrite, source=source,
                     preshuffled=cfg.preshuffle, codec=cfg.codec) as w:
        if write_dask is not None:
            write_dask(w, al=al, obs_list=obs_list, keeps=keeps, block_size=cfg.block_size)
            log.info("wrote %s: %d cells, %d genes, %d regions (%s)", cfg.out, n_total, G, R, _where(cfg))
            return Path(cfg.out)  # the with-block closes the writer: stats, complete: true, rename
        # spilled inside the temporary store: a killed build leaves that one refused .tmp- dir (docs/store.md),
        # not also a full copy of the input next to the output that no later run would ever remove
        shuffler = BucketShuffler(-(-n_total // cfg.shard_size), cfg.seed, w.tmp) if cfg.preshuffle else None
        try:
            bar = tqdm(total=n_total, unit="cell", desc="mva-build", disable=not cfg.progress)
            for src, obs, keep, cm in zip(sources, obs_list, keeps, al.colmaps):
                for start, rna, atac in src.blocks(cfg.block_size):
                    stop = start + (rna.shape[0] if rna is not None else atac.shape[0])
                    ids = obs.index[start:stop]
                    blocks = []
                    for mod, x, n_cols in (("rna", rna, G), ("atac", atac, R)):
                        if x is None or cm[mod] is None:
                            blocks.append(sp.csr_matrix((stop - start, n_cols), dtype=np.uint8))
                            continue
                        x = sp.csr_matrix(x)
                        check_counts(x, src.name, mod, ids, src.features[mod].index)
                        blocks.append(remap_columns(x, cm[mod], n_cols))
                        # dropped cells (no modality at all) are not checked: they are not written
                        check_unmeasured_empty(blocks[-1], obs[f"mask_{mod}"].to_numpy(bool)[start:stop]
                                               | ~keep[start:stop], src.name, mod, ids)
                    k = keep[start:stop]
                    sel = np.flatnonzero(k)
                    b_rna, b_atac, b_obs = blocks[0][sel], blocks[1][sel], obs.iloc[start:stop].iloc[sel]
                    if shuffler is not None:
                        shuffler.add(b_rna, b_atac, b_obs)
                    else:
                        try:
                            w.append(b_rna, b_atac, b_obs)
                        except (ValueError, KeyError) as exc:  # name the input, not just the cell
                            raise ValidationError(f"{src.name}: {exc}") from exc
                    bar.update(len(sel))
            if shuffler is not None:
                for b_rna, b_atac, b_obs in shuffler.buckets():
                    w.append(b_rna, b_atac, b_obs)
            bar.close()
        finally:
            if shuffler is not None:
                shuffler.cleanup()
    log.info("wrote %s: %d cells, %d genes, %d regions (%s)", cfg.out, n_total, G, R, _where(cfg))
    return Path(cfg.out)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, (str, int, float, bool, type(None))) else str(x)


def main() -> None:
    import hydra

    from data.typed_config import to_typed

    @hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent.parent / "conf"),
                config_name="build")
    def _run(cfg) -> None:
        # Hydra's "disabled" job logging disables loggers created before it ran; ours reports on stderr.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.handlers, log.disabled, log.propagate = [handler], False, False
        log.setLevel(logging.INFO)
        # bad config/input (ConfigError, ValidationError are ValueErrors), a missing input, an existing or
        # unwritable output; build_store has already removed its temporary store
        with one_line_errors("mva-build", (ValueError, OSError)):
            out = build_store(to_typed(cfg, BuildConfig))
        print(f"wrote {out}")

    check_overrides("mva-build", BuildConfig)
    _run()


if __name__ == "__main__":
    main()
