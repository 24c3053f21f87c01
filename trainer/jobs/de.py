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
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data import keys
from data.stream import StoreStream
from trainer import differential as D
from trainer import dist
from trainer.export import load_model
from trainer.infer_config import InferConfig
from trainer.jobs.common import InferError, Progress, open_checked_store, resolve_model_dir
from trainer.predict import latent, normalized_expression

RAW_ROWS = 4096  # store rows per step of the raw-statistics pass
READ_CHUNK = 256  # the loader's rows per read chunk (StoreStream's default chunk_size)
MAX_READ_CHUNKS = 64  # reader chunks resident per read of sampled cells (memory: 64 x 256 rows of counts)
HEAD_ROWS = 4096  # samples per output-layer product (da): caps its temporaries
STATS_COLUMNS = 2048  # features per statistics call: caps the (samples x features) temporaries
# Test hook (same name as embed's): raise after this many comparisons were written by this process.
FAIL_AFTER_ENV = "MVA_INFER_FAIL_AFTER_CHUNKS"
REST = "Rest"


@dataclass(frozen=True)
class Comparison:
    group1: str
    group2: str
    set1: int  # index into the cell sets
    set2: int | None  # None = every cell not in set1


# ------------------------------------------------------------------------------------------ groups
def _read_ids(path: str, obs: pd.DataFrame) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise InferError(f"cell-id file {p} does not exist")
    ids = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not ids:
        raise InferError(f"cell-id file {p} is empty")
    pos = obs.index.get_indexer(pd.Index(ids).unique())
    if (pos < 0).any():
        missing = [i for i, q in zip(pd.Index(ids).unique(), pos, strict=True) if q < 0]
        raise InferError(f"{len(missing)} cell ids of {p} are not in the store (first: {missing[:3]})")
    return np.sort(pos).astype(np.int64)


def cell_sets(cfg: InferConfig, obs: pd.DataFrame) -> tuple[list[np.ndarray], list[Comparison], bool]:
    """(cell sets as sorted row indices, comparisons, groupby mode?) from the de options."""
    o = cfg.de
    if o.cells1 is not None:
        if o.groupby is not None:
            raise InferError("give either de.groupby or de.cells1 (explicit cell sets), not both")
        sets = [_read_ids(o.cells1, obs)] + ([_read_ids(o.cells2, obs)] if o.cells2 else [])
        return sets, [Comparison("cells1", "cells2" if o.cells2 else REST, 0, 1 if o.cells2 else None)], False
    if o.groupby is None:
        raise InferError("set de.groupby (an obs column) or de.cells1 (a file of cell ids)")
    if o.groupby not in obs.columns:
        raise InferError(f"de.groupby column {o.groupby!r} is not in the store's obs (columns: {list(obs.columns)})")
    col = obs[o.groupby]
    values = col.astype(str).where(col.notna(), None).to_numpy(dtype=object)
    present = pd.unique(values[pd.notna(values)])
    if isinstance(col.dtype, pd.CategoricalDtype):  # category order, as the reference lists groups
        present = [str(c) for c in col.cat.categories if str(c) in set(present)]
    else:
        present = sorted(present)
    for g in list(o.group1 or []) + ([o.group2] if o.group2 is not None else []):
        if str(g) not in present:
            raise InferError(f"group {g!r} has no cells in column {o.groupby!r} (groups: {present[:20]})")
    group1 = [str(g) for g in o.group1] if o.group1 is not None else present
    if o.group1 is None and len(present) < 2:
        raise InferError(f"column {o.groupby!r} has a single group: nothing to compare")
    names = list(dict.fromkeys(group1 + ([str(o.group2)] if o.group2 is not None else [])))
    sets = [np.flatnonzero(values == g).astype(np.int64) for g in names]
    comps = [Comparison(g, REST if o.group2 is None else str(o.group2), names.index(g),
                        None if o.group2 is None else names.index(str(o.group2))) for g in group1]
    for c in comps:
        if c.set2 is None and len(sets[c.set1]) == len(obs):
            raise InferError(f"group {c.group1!r} holds every cell: the rest is empty")
        if c.set2 is not None and c.set1 == c.set2:
            raise InferError(f"group1 and group2 are the same group {c.group1!r}")
    return sets, comps, True


def _complement(cells: np.ndarray, n: int) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[cells] = False
    return np.flatnonzero(keep)


# ------------------------------------------------------------------------------------ raw statistics
def raw_sums(store, modality: str, sets: list[np.ndarray], feat: np.ndarray, with_norm: bool,
             rank: int = 0, world_size: int = 1) -> dict[str, np.ndarray]:
    """Per-set sums over all cells (sets x features, float64) plus a last row for ALL cells.

    ``norm``: counts scaled by 1e4 / the cell's total RNA count (over all genes); cells with no RNA
    count add zero (the reference's sparse path does the same; its dense path gives NaN).
    """
    n = store.meta.n_cells
    rows = np.concatenate([s for s in sets] + [np.arange(n)])
    cols = np.concatenate([np.full(len(s), j) for j, s in enumerate(sets)] + [np.full(n, len(sets))])
    member = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, len(sets) + 1))
    out = {k: np.zeros((len(sets) + 1, len(feat))) for k in (["sum", "nnz"] + (["norm"] if with_norm else []))}
    offs = store.meta.shard_offsets
    steps = [(s, a, min(a + RAW_ROWS, offs[s + 1] - offs[s])) for s in range(store.meta.n_shards)
             for a in range(0, offs[s + 1] - offs[s], RAW_ROWS)]
    for s, a, b in steps[rank::world_size]:
        x = store.read_rows(modality, s, a, b).astype(np.float64)
        mt = member[offs[s] + a: offs[s] + b].T.tocsr()
        xs = x[:, feat]
        out["sum"] += (mt @ xs).toarray()
        out["nnz"] += (mt @ (xs > 0).astype(np.float64)).toarray()
        if with_norm:
            total = np.asarray(x.sum(axis=1)).ravel()
            scale = np.divide(1e4, total, out=np.zeros_like(total), where=total > 0)
            out["norm"] += (mt @ sp.diags(scale) @ xs).toarray()
    if dist.is_distributed():
        dev = dist._collective_device()  # NCCL reduces CUDA tensors only
        for k, v in out.items():
            t = torch.from_numpy(v).to(dev)
            torch.distributed.all_reduce(t)
            out[k] = t.cpu().numpy()
    return out


def _raw_of(sums: dict, j: int | None, set1: int, n: dict) -> dict[str, np.ndarray]:
    """Raw means of set ``j`` (None = all cells except set ``set1``)."""
    if j is not None:
        return D.raw_columns({k: v[j] for k, v in sums.items()}, n[j])
    return D.raw_columns({k: v[-1] - v[set1] for k, v in sums.items()}, n["all"] - n[set1])


# ---------------------------------------------------------------------------------------- sampling
class Sampler:
    """Decoded scales of one comparison side's sampled cells, for one block of features at a time."""

    def __init__(self, module, stream: StoreStream, job: str, cells: np.ndarray, cfg: InferConfig, key: str):
        o, self.module, self.stream, self.job, self.bs = cfg.de, module, stream, job, cfg.batch_size
        self.seed = cfg.seed
        self.key = key
        if o.batch_correction:
            k = D.samples_per_batch(o.n_samples_overall, module.n_batch)
            # every group is decoded under every batch; both sides list batches in code order, so row i
            # of one side pairs with row i of the other within the same batch (the reference's pairing)
            self.parts = [(b, D.sample_cells(cells, k, cfg.seed, f"{key}|b{b}")) for b in range(module.n_batch)]
        else:
            self.parts = [(None, D.sample_cells(cells, o.n_samples_overall, cfg.seed, key))]
        self.n = sum(len(c) for _, c in self.parts)
        self._hidden: dict[int, torch.Tensor] = {}  # da: per part, decoder hidden states of the draws

    def block(self, feat: np.ndarray) -> np.ndarray:
        """(samples, len(feat)) float32."""
        out = np.empty((self.n, len(feat)), dtype=np.float32)
        row = 0
        for p, (code, cells) in enumerate(self.parts):
            self._decode(code, cells, feat, p, out[row:row + len(cells)])
            row += len(cells)
        return out

    @torch.no_grad()
    def _decode(self, code: int | None, cells: np.ndarray, feat: np.ndarray, part: int, out: np.ndarray) -> None:
        full = len(feat) == (self.module.n_genes if self.job == "de" else self.module.n_regions) \
            and bool((np.diff(feat) == 1).all()) and feat[0] == 0
        idx = None if full else torch.as_tensor(feat, dtype=torch.long)  # no copy of every column
        dev = next(self.module.parameters()).device
        if self.job == "de":
            # decoded from the posterior mean (the reference's default): each distinct cell once
            uniq, inv = np.unique(cells, return_inverse=True)
            dec = np.empty((len(uniq), len(feat)), dtype=np.float32)
            for rows in read_groups(uniq, self.bs):
                dec[rows] = normalized_expression(self.module, self._batch(uniq[rows], dev), transform_batch=code,
                                                  gene_index=idx).cpu().numpy()
            np.take(dec, inv, axis=0, out=out)
            return
        # da: p = sigmoid(atac_out(h)) with h the ATAC decoder's last hidden layer (samples x n_hidden,
        # small): h is computed once per sample and kept, so a feature block costs only its own
        # columns of the output layer instead of a full decode (200k peaks -> 8 blocks at block_mb=1024)
        h = self._atac_hidden(code, cells, part, dev)
        w, b = self.module.atac_out.weight, self.module.atac_out.bias
        if idx is not None:
            w, b = w[idx.to(w.device)], b[idx.to(b.device)]
        for lo in range(0, len(cells), HEAD_ROWS):
            out[lo:lo + HEAD_ROWS] = torch.sigmoid(torch.nn.functional.linear(h[lo:lo + HEAD_ROWS], w, b)).cpu().numpy()

    @torch.no_grad()
    def _atac_hidden(self, code: int | None, cells: np.ndarray, part: int, dev) -> torch.Tensor:
        """(samples, n_hidden) decoder hidden states of one posterior draw per sampled cell (cached).

        The draw is ``predict.latent(give_mean=False)``, the same as normalized_accessibility(
        use_z_mean=False), the reference's DA model function. Rows are read in cell order; draws are
        seeded per read group, so they are a pure function of (seed, side, sample)."""
        if part in self._hidden:
            return self._hidden[part]
        m = self.module
        h = torch.empty((len(cells), m.atac_out.in_features), dtype=m.atac_out.weight.dtype, device=dev)
        order = np.argsort(cells, kind="stable")
        for c, rows in enumerate(read_groups(cells[order], self.bs)):
            sel = torch.as_tensor(order[rows], device=dev)
            batch = self._batch(cells[order[rows]], dev)
            torch.manual_seed(D.derived_seed(self.seed, f"{self.key}|{part}|{c}"))
            z = latent(m, batch, modality="joint", give_mean=False, n_samples=1)[0]
            codes = None if code is None else torch.full((len(z),), code, dtype=torch.long, device=dev)
            h_in, cov, _ = m._decoder_input(z, batch, codes)  # the decoders' input, as module.generative
            h[sel] = m.atac_decoder(h_in, cov)
        self._hidden[part] = h
        return h

    def _batch(self, cells: np.ndarray, dev) -> dict:
        from data.collate import to_device

        return to_device(self.stream.make_batch(cells), dev)


def read_groups(sorted_cells: np.ndarray, batch_size: int, chunk_rows: int = READ_CHUNK,
                max_chunks: int = MAX_READ_CHUNKS) -> list[slice]:
    """Consecutive slices of sorted cell ids, each at most ``batch_size`` cells touching at most
    ``max_chunks`` reader chunks: the loader keeps every chunk of one read resident, so scattered
    samples read in plain batches would hold ~batch_size chunks (GBs with many features)."""
    out, lo, n = [], 0, len(sorted_cells)
    chunk = sorted_cells // chunk_rows
    while lo < n:
        hi = min(lo + batch_size, n)
        # the last position whose chunk is within max_chunks distinct chunks of lo's
        distinct = np.flatnonzero(np.diff(chunk[lo:hi])) + 1  # starts of new chunks within [lo, hi)
        if len(distinct) >= max_chunks:
            hi = lo + int(distinct[max_chunks - 1])
        out.append(slice(lo, hi))
        lo = hi
    return out


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
    return pos.astype(np.int64)


def _run(cfg: InferConfig, job: str) -> dict:
    info = dist.init_distributed()
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
    if final.exists() and not cfg.overwrite:
        raise InferError(f"{final} already exists: pass overwrite=true to replace it")
    progress = Progress(parts_dir)
    fp = {**{k: v for k, v in asdict(cfg).items() if k not in ("output", "overwrite", "progress")},
          "job": job, "model_dir": str(model_dir.resolve()),
          "model_mtime_ns": (model_dir / "model.safetensors").stat().st_mtime_ns}
    old = parts_dir / "job.json"
    if not cfg.overwrite and old.is_file() and json.loads(old.read_text()) != json.loads(json.dumps(fp)):
        # checked on every rank (not only in Progress.start on rank 0): no rank waits for a failed one
        raise InferError(f"an unfinished output from different settings is in {parts_dir}; "
                         f"rerun with overwrite=true to start over")
    dist.barrier()
    if info.is_main:
        if cfg.overwrite:
            final.unlink(missing_ok=True)
            shutil.rmtree(parts_dir, ignore_errors=True)
        progress.start(fp)  # raises if an unfinished run with other settings is in the way
    dist.barrier()

    sums = raw_sums(store, modality, sets, feat, with_norm=job == "de", rank=info.rank, world_size=info.world_size)
    n = {j: len(s) for j, s in enumerate(sets)} | {"all": store.meta.n_cells}
    stream = StoreStream(store, batch_size=cfg.batch_size, split="all", shuffle=False, prefetch=0,
                         chunk_size=READ_CHUNK)
    names = [all_names[i] for i in feat]
    mine = [k for k in range(len(comps)) if k % info.world_size == info.rank and not progress.is_done(k)]
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"[infer] {job} (rank 0)", unit="comparison")
    for k in mine:
        c = comps[k]
        cells2 = sets[c.set2] if c.set2 is not None else _complement(sets[c.set1], store.meta.n_cells)
        key = f"{job}|{c.group1}|{c.group2}"
        s1 = Sampler(module, stream, job, sets[c.set1], cfg, key + "|1")
        s2 = Sampler(module, stream, job, cells2, cfg, key + "|2")
        df = compare(s1, s2, feat, names, _raw_of(sums, c.set1, c.set1, n), _raw_of(sums, c.set2, c.set1, n),
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
        shutil.rmtree(parts_dir, ignore_errors=True)
        dist.print0(f"[infer] {job}: {len(comps)} comparison(s) x {len(feat)} features -> {final}")
    dist.barrier()
    return {"output": str(final), "n_comparisons": len(comps), "n_features": len(feat), "computed": len(mine),
            "rank": info.rank, "world_size": info.world_size}


def _write_table(table: pd.DataFrame, final: Path, fmt: str) -> None:
    """Write to a temp name in the same directory, then rename: a table at ``final`` is always complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    if fmt == "parquet":
        table.to_parquet(tmp)
    else:
        table.to_csv(tmp)
    tmp.replace(final)
