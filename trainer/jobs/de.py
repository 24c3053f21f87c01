"""de / da: differential expression and accessibility between cell groups, streamed over the store.

Semantics are the reference's (scvi-tools MULTIVI.differential_expression / _accessibility; the
statistics are in ``trainer.differential``); docs/inference_de.md lists the options and deviations.

How it streams (nothing of size cells x features is held):
1. Raw statistics (raw means, non-zero proportions, 1e4-normalised means) over ALL cells of every
   group: one pass over the store's rows, accumulating per-group sums (groups x features).
2. Per comparison and side, ``n_samples_overall`` cells are drawn with replacement by a seeded pure
   function; only those cells are read and decoded, in batches. The (samples x features) matrices of
   the two sides are the only large arrays; when they would exceed ``de.block_mb`` the features are
   processed in blocks (da keeps the decoder's hidden states of its draws, samples x n_hidden, so a
   block costs only its output-layer columns; de decodes the sampled cells again per block).

Ranks under torchrun: the raw pass is sharded by rows (sums all-reduced); comparisons are dealt
round-robin over ranks, each writing ``<output>.parts/comp-<k>.parquet``; rank 0 concatenates them in
comparison order into ``<output>`` (written to a temp name, then renamed). A rerun after a crash skips
the comparisons whose part is already written.

Modules: ``de_groups`` (cell sets, comparisons, the raw pass), ``de_sampling`` (seeded draws, bounded
reads and decoding of the sampled cells), this one (per-comparison statistics and table, the job with
its restart bookkeeping).
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from data import keys
from trainer import differential as D
from trainer import dist
from trainer.export import load_model
from trainer.infer_config import InferConfig
from trainer.jobs.common import (
    InferError,
    Progress,
    inference_stream,
    open_checked_store,
    resolve_model_dir,
    store_identity,
)
from trainer.jobs.de_groups import cell_sets, complement, raw_of, raw_sums
from trainer.jobs.de_sampling import READ_CHUNK, Sampler
from trainer.jobs.runner import _empty_dir, finish_leftover, holding_lock

STATS_COLUMNS = 2048  # features per statistics call: caps the (samples x features) temporaries
# Test hook (same name as embed's): raise after this many comparisons were written by this process.
FAIL_AFTER_ENV = "MVA_INFER_FAIL_AFTER_CHUNKS"


# config keys that do not change a de/da table (the resume fingerprint leaves them out)
_NOT_DE_SETTINGS = ("output", "overwrite", "progress", "timeout_s", "device", "model_dir", "store", "embed",
                    "expression", "accessibility", "export")


# ------------------------------------------------------------------------------------- comparisons

def compare(s1: Sampler, s2: Sampler, feat: np.ndarray, names: list[str], raw1: dict, raw2: dict,
            cfg: InferConfig, job: str) -> pd.DataFrame:
    """One comparison's table (reference columns) over the features ``feat``."""
    o = cfg.de
    width = max(1, (o.block_mb << 20) // (4 * (s1.n + s2.n)))
    blocks = [np.arange(a, min(a + width, len(feat))) for a in range(0, len(feat), width)]
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def pair(i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in cache:
            return cache[i]
        got = s1.block(feat[blocks[i]]), s2.block(feat[blocks[i]])
        if len(blocks) == 1:  # one block: decode once for every pass
            cache[i] = got
        return got

    if o.mode == "vanilla":
        stats = _concat([_by_columns(D.vanilla_stats, *pair(i)) for i in range(len(blocks))])
    else:
        pc = o.pseudocounts
        if pc == "auto":
            maxes = [tuple(a.max(0) for a in pair(i)) for i in range(len(blocks))]
            pc = D.estimate_pseudocounts(np.concatenate([m[0] for m in maxes]), np.concatenate([m[1] for m in maxes]),
                                         raw1["mean"] < D.ZERO_COUNT_THRESHOLD, raw2["mean"] < D.ZERO_COUNT_THRESHOLD)
        delta = D.DEFAULT_DELTA[job] if o.delta is None else o.delta
        if delta == "auto":
            means = np.concatenate([_by_columns(lambda a, b: {"m": D.lfc(a, b, pc).mean(0)}, *pair(i))["m"]
                                    for i in range(len(blocks))])
            try:
                delta = D.estimate_delta(means, seed=cfg.seed)
            except ValueError as exc:  # too few features, or no scikit-learn: one line, not a traceback
                raise InferError(str(exc)) from None
        stats = _concat([_by_columns(D.change_stats, *pair(i), delta=float(delta), pseudocounts=float(pc),
                                     test_mode=o.test_mode) for i in range(len(blocks))])
    if job == "de":
        df = pd.DataFrame({**stats, "raw_mean1": raw1["mean"], "raw_mean2": raw2["mean"],
                           "non_zeros_proportion1": raw1["nonzero"], "non_zeros_proportion2": raw2["nonzero"],
                           "raw_normalized_mean1": raw1["norm_mean"], "raw_normalized_mean2": raw2["norm_mean"]},
                          index=pd.Index(names))
        df = df.sort_values("proba_de" if o.mode == "change" else "bayes_factor", ascending=False, kind="stable")
        if o.mode == "change":
            df[f"is_de_fdr_{o.fdr_target}"] = D.fdr_flags(df["proba_de"].to_numpy(), o.fdr_target)
        return df
    prob = stats["proba_de"] if o.mode == "change" else stats["proba_m1"]
    return pd.DataFrame({
        "prob_da": prob,
        "is_da_fdr": D.fdr_flags(prob, o.fdr_target) if o.mode == "change" else None,
        "bayes_factor": stats["bayes_factor"],
        "effect_size": stats["scale2"] - stats["scale1"],  # group2 - group1, as the reference
        "emp_effect": raw2["nonzero"] - raw1["nonzero"],
        "est_prob1": stats["scale1"], "est_prob2": stats["scale2"],
        "emp_prob1": raw1["nonzero"], "emp_prob2": raw2["nonzero"],
    }, index=pd.Index(names))  # region order, as the reference


def _by_columns(fn, s1: np.ndarray, s2: np.ndarray, **kw) -> dict[str, np.ndarray]:
    """``fn`` (per-feature statistics) over column slices: same result, temporaries of bounded size."""
    return _concat([fn(s1[:, a:a + STATS_COLUMNS], s2[:, a:a + STATS_COLUMNS], **kw)
                    for a in range(0, s1.shape[1], STATS_COLUMNS)])


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------- job
def run_de(cfg: InferConfig) -> dict:
    return _run(cfg, "de")


def run_da(cfg: InferConfig) -> dict:
    return _run(cfg, "da")


def _features(cfg: InferConfig, all_names: list[str], job: str) -> np.ndarray:
    if cfg.de.features is None:
        return np.arange(len(all_names))
    pos = pd.Index(all_names).get_indexer(pd.Index([str(f) for f in cfg.de.features]))
    if (pos < 0).any():
        bad = [f for f, p in zip(cfg.de.features, pos, strict=True) if p < 0]
        raise InferError(f"{len(bad)} de.features are not {'genes' if job == 'de' else 'regions'} of the model "
                         f"(first: {bad[:3]})")
    if len(pos) == 0:
        raise InferError("de.features is an empty list")
    if len(set(pos.tolist())) < len(pos):  # one row per feature: a repeat would also count twice in the FDR
        dup = pd.Index([str(f) for f in cfg.de.features])
        raise InferError(f"de.features lists names more than once: {sorted(set(dup[dup.duplicated()]))[:10]}")
    return pos.astype(np.int64)


def _run(cfg: InferConfig, job: str) -> dict:
    info = dist.init_distributed(cfg.timeout_s, device=cfg.device)
    model_dir = resolve_model_dir(cfg.model_dir)
    module, minfo = load_model(model_dir, device=info.device)
    store = open_checked_store(cfg.store, minfo)
    modality = keys.RNA if job == "de" else keys.ATAC
    all_names = store.meta.gene_names if job == "de" else store.meta.region_names
    feat = _features(cfg, list(all_names), job)
    obs = store.read_obs()
    sets, comps, by_group = cell_sets(cfg, obs)
    for c in comps:
        if c.set2 is None and len(sets[c.set1]) == store.meta.n_cells:
            raise InferError(f"{c.group1} holds every cell of the store: the rest is empty")

    final = Path(cfg.output)
    parts_dir = final.with_name(final.name + ".parts")
    if final.exists() and not _is_table(final):
        # overwrite deletes the file: never one this job did not write (a mistyped output= naming the user's
        # own notes or a directory), as the chunked jobs replace only their own outputs
        raise InferError(f"{final} exists and is not an mva-infer de/da table (neither de's {sorted(_OWN_COLUMNS[0])} "
                         f"nor da's {sorted(_OWN_COLUMNS[1])} columns): "
                         "overwrite=true only replaces those; remove it yourself or choose another output")
    # what decides the table: not the other jobs' sections or the timeout, and the store / model by
    # where they really are (a relative path typed differently is the same run)
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_DE_SETTINGS}
    # the cell-id files count by their content (cells_sha), not by how their paths were typed: a rerun naming
    # the same files by an absolute path, or from another directory, was refused as "different settings"
    settings["de"] = {**settings["de"], "cells1": cfg.de.cells1 is not None, "cells2": cfg.de.cells2 is not None}
    fp = {**settings,
          "job": job, "model_dir": str(model_dir.resolve()), **store_identity(store),
          # the cell-id files by content: a file rewritten between a crash and the rerun is another run
          "cells_sha": [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in (cfg.de.cells1, cfg.de.cells2)
                        if f is not None and Path(f).is_file()],
          "model_mtime_ns": (model_dir / "model.safetensors").stat().st_mtime_ns}
    if final.exists() and not cfg.overwrite:
        # killed between writing the table and cleaning up
        if finish_leftover(parts_dir, fp, info, final, job, lambda: _is_table(final)):
            return {"output": str(final), "n_comparisons": len(comps), "n_features": len(feat), "computed": 0,
                    "rank": info.rank, "world_size": info.world_size}
        raise InferError(f"{final} already exists: pass overwrite=true to replace it")
    dist.barrier()  # every rank has checked the output before rank 0 takes the lock
    # rank 0 holds <output>.parts/.mva.lock for the whole job, as the chunked jobs hold theirs: a second job
    # on the same output (overwrite=true, other settings) emptied the parts directory under a running one,
    # whose table then mixed both jobs' comparisons; a lock left by a killed job is cleared (holder dead)
    with holding_lock(parts_dir, info):
        return _run_locked(cfg, job, info, module, minfo, store, modality, all_names, feat, sets, comps, by_group,
                           final, parts_dir, fp)


def _run_locked(cfg, job, info, module, minfo, store, modality, all_names, feat, sets, comps, by_group, final,
                parts_dir, fp) -> dict:
    progress = Progress(parts_dir)
    if final.exists() and not cfg.overwrite:  # another job finished it while this one was starting
        raise InferError(f"{final} already exists: pass overwrite=true to replace it")
    if not cfg.overwrite:  # on every rank (not only in Progress.start on rank 0): no rank waits for a failed one
        progress.refuse_other_settings(fp)  # naming each changed key with both values
    dist.barrier()
    if info.is_main:
        if cfg.overwrite:
            final.unlink(missing_ok=True)
            _empty_dir(parts_dir)  # keeps our lock
        progress.start(fp)  # raises if an unfinished run with other settings is in the way
    dist.barrier()

    sums = raw_sums(store, modality, sets, feat, with_norm=job == "de", rank=info.rank, world_size=info.world_size)
    n = {j: len(s) for j, s in enumerate(sets)} | {"all": store.meta.n_cells}
    # size factors in the batch: a model trained with use_size_factor reads them in module.inference
    stream = inference_stream(store, module, minfo, batch_size=cfg.batch_size, split="all", shuffle=False,
                              prefetch=0, chunk_size=READ_CHUNK)
    names = [all_names[i] for i in feat]
    mine = [k for k in range(len(comps)) if k % info.world_size == info.rank and not progress.is_done(k)]
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"[infer] {job} (rank 0)", unit="comparison")
    for k in mine:
        c = comps[k]
        cells2 = sets[c.set2] if c.set2 is not None else complement(sets[c.set1], store.meta.n_cells)
        key = f"{job}|{c.group1}|{c.group2}"
        s1 = Sampler(module, stream, job, sets[c.set1], cfg, key + "|1")
        s2 = Sampler(module, stream, job, cells2, cfg, key + "|2")
        df = compare(s1, s2, feat, names, raw_of(sums, c.set1, c.set1, n), raw_of(sums, c.set2, c.set1, n),
                     cfg, job)
        if by_group:  # the reference adds these in groupby mode only
            df["comparison"], df["group1"], df["group2"] = f"{c.group1} vs {c.group2}", c.group1, c.group2
        tmp = parts_dir / f"comp-{k:05d}.parquet.tmp"  # parquet: exact floats and dtypes for the concat
        df.to_parquet(tmp)
        tmp.rename(parts_dir / f"comp-{k:05d}.parquet")
        progress.mark_done(k)
        if bar is not None:
            bar.update(1)
        if fail_after and mine.index(k) + 1 >= fail_after:
            raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: simulated crash after {fail_after} comparisons")
    if bar is not None:
        bar.close()
    dist.barrier()
    if info.is_main:
        missing = [k for k in range(len(comps)) if not progress.is_done(k)]
        if missing:
            raise InferError(f"{len(missing)} comparisons were not written (first: {missing[:5]}); rerun to finish")
        table = pd.concat([pd.read_parquet(parts_dir / f"comp-{k:05d}.parquet") for k in range(len(comps))])
        _write_table(table, final, cfg.de.format)
        _empty_dir(parts_dir)  # the lock stays until _run releases it
        dist.print0(f"[infer] {job}: {len(comps)} comparison(s) x {len(feat)} features -> {final}")
    dist.barrier()
    return {"output": str(final), "n_comparisons": len(comps), "n_features": len(feat), "computed": len(mine),
            "rank": info.rank, "world_size": info.world_size}


# columns in every table of each job, both modes, groupby and cell-file tables alike (the latter, as the
# reference's, have no comparison / group1 / group2 columns: requiring those refused overwrite=true on them)
_OWN_COLUMNS = ({"bayes_factor", "raw_mean1", "raw_mean2", "non_zeros_proportion1"},  # de
                {"prob_da", "bayes_factor", "emp_prob1", "emp_prob2"})  # da


def _is_table(path: Path) -> bool:
    """A de/da table (csv or parquet, told by its columns), the only kind of file overwrite=true replaces."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            parquet = fh.read(4) == b"PAR1"
        if parquet:
            import pyarrow.parquet as pq

            names = set(pq.read_schema(path).names)
        else:
            with path.open(newline="", errors="replace") as fh:
                names = set(next(csv.reader(fh), []))
    except (OSError, ValueError, csv.Error):  # pyarrow's ArrowInvalid is a ValueError
        return False
    return any(cols <= names for cols in _OWN_COLUMNS)


def _write_table(table: pd.DataFrame, final: Path, fmt: str) -> None:
    """Write to a temp name in the same directory, then rename: a table at ``final`` is always complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # one name, under the job's lock: a killed write's file is overwritten by the rerun's, not left beside the
    # table for ever (it was named by the pid)
    tmp = final.with_name(final.name + ".tmp")
    if fmt == "parquet":
        table.to_parquet(tmp)
    else:
        table.to_csv(tmp)
    tmp.replace(final)
