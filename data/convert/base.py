"""Input readers: .h5ad pair, .h5mu, scvi-tools single-AnnData layout, 10x Cell Ranger ARC .h5.

Each reader turns one input into the same shape (see ``data/convert/__init__.py``): an obs table with
explicit modality masks, one feature table per measured modality, and row blocks of counts in the
input's own feature order. Feature alignment across inputs, validation and writing live in
``data.build``; readers only read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data.config import InputConfig
from data.convert.h5 import H5AnnDataGroup, H5CSRRows, open_h5

RNA_MOD_NAMES = ("rna", "gex", "RNA", "GEX", "Gene Expression")
ATAC_MOD_NAMES = ("atac", "peaks", "ATAC", "accessibility", "Peaks")


def scatter_rows(compact: sp.csr_matrix, rows: np.ndarray, n: int) -> sp.csr_matrix:
    """An (n, .) CSR whose rows ``rows`` are the rows of ``compact`` and whose other rows are empty."""
    nnz = np.zeros(n, np.int64)
    nnz[rows] = np.diff(compact.indptr)
    order = np.argsort(rows, kind="stable")
    if not np.array_equal(order, np.arange(len(rows))):
        compact = compact[order]
    return sp.csr_matrix((compact.data, compact.indices, np.concatenate([[0], np.cumsum(nnz)])),
                         shape=(n, compact.shape[1]))


def _fill_missing(obs: pd.DataFrame, other: pd.DataFrame) -> None:
    """Add ``other``'s columns that ``obs`` lacks and fill ``obs``'s missing values from it, per cell id."""
    other = other.reindex(obs.index)
    for col in other.columns:
        if col not in obs.columns:
            obs[col] = other[col].values
            continue
        # A column of only one modality's obs is NaN for the other modality's cells once joined.
        miss = obs[col].isna().to_numpy() & other[col].notna().to_numpy()
        if miss.any():
            vals = obs[col].astype(object).to_numpy()
            vals[miss] = other[col].astype(object).to_numpy()[miss]
            obs[col] = vals


class Source:
    """Common interface; subclasses set name, obs, features and implement ``_rows``."""

    name: str
    obs: pd.DataFrame
    features: dict[str, pd.DataFrame | None]
    warnings: tuple[str, ...] = ()  # what mva-build logs once about this input (e.g. .h5mu modalities not read)
    # (where, table): the per-cell tables ``obs`` was merged from (RNA obs, ATAC obs, an .h5mu's global obs),
    # indexed by the input's own cell ids; mva-build checks that they agree on the columns it uses
    obs_parts: tuple[tuple[str, pd.DataFrame], ...] = ()

    def _rows(self, start: int, stop: int) -> tuple[sp.csr_matrix | None, sp.csr_matrix | None]:
        raise NotImplementedError

    def blocks(self, block_size: int) -> Iterator[tuple[int, sp.csr_matrix | None, sp.csr_matrix | None]]:
        for start in range(0, len(self.obs), block_size):
            stop = min(start + block_size, len(self.obs))
            yield (start, *self._rows(start, stop))

    def close(self) -> None:
        for h in getattr(self, "_handles", []):
            h.close()


class PairSource(Source):
    """Two AnnData groups (RNA, ATAC) whose cells overlap partly: union of cells, RNA order first.

    Used for a pair of .h5ad files and for the two modalities of an .h5mu. Either side may be None
    (an RNA-only or ATAC-only dataset).
    """

    def __init__(self, rna: H5AnnDataGroup | None, atac: H5AnnDataGroup | None, name: str,
                 extra_obs: pd.DataFrame | None = None):
        if rna is None and atac is None:
            raise ValueError(f"{name}: neither an RNA nor an ATAC matrix was given")
        self.name, self._rna, self._atac = name, rna, atac
        self._handles = [g for g in (rna, atac) if g is not None]
        rna_ids = rna.obs.index if rna is not None else pd.Index([], dtype=str)
        atac_ids = atac.obs.index if atac is not None else pd.Index([], dtype=str)
        for g in self._handles:
            if not g.obs.index.is_unique:
                dup = g.obs.index[g.obs.index.duplicated()][0]
                raise ValueError(f"{g.where}: duplicate cell id {dup!r} in obs index")
        atac_only = atac_ids[~atac_ids.isin(rna_ids)]
        parts = []
        if rna is not None:
            parts.append(rna.obs)
        if atac is not None and len(atac_only):  # an empty frame would still upcast int columns to float
            parts.append(atac.obs.loc[atac_only])
        obs = pd.concat(parts) if len(parts) > 1 else parts[0].copy()
        # A paired cell's values come from the RNA obs; the ATAC obs (a label only it has), then the global
        # obs of an .h5mu (MuData's own per-cell table) supply the columns and values it lacks. Where two of
        # them hold different values for one cell, mva-build refuses the columns it uses (obs_parts).
        parts_of = [(g.where + " obs", g.obs) for g in (rna, atac) if g is not None]
        if atac is not None and rna is not None:
            _fill_missing(obs, atac.obs)
        if extra_obs is not None:
            _fill_missing(obs, extra_obs)
            parts_of.append((f"{name}: global obs", extra_obs))
        self.obs_parts = tuple(parts_of)
        obs["mask_rna"] = obs.index.isin(rna_ids)
        obs["mask_atac"] = obs.index.isin(atac_ids)
        self.obs = obs
        self.n_rna = len(rna_ids)
        if len(rna_ids) and len(atac_ids) and not rna_ids.isin(atac_ids).any():
            # legal (an RNA-only and an ATAC-only set), but far more often the same cells named differently
            msg = (f"{name}: no cell id is in both the RNA ({len(rna_ids)} cells, e.g. {rna_ids[0]!r}) and the ATAC "
                   f"({len(atac_ids)} cells, e.g. {atac_ids[0]!r}) data, so no cell is paired; if they are the same "
                   "cells, make their ids match")
            self.warnings = (msg,)
        # Position of every union cell in the ATAC matrix (-1 = not measured).
        self._atac_pos = atac_ids.get_indexer(obs.index) if atac is not None else None
        self.features = {"rna": rna.var if rna is not None else None,
                         "atac": atac.var if atac is not None else None}

    def _rows(self, start, stop):
        n = stop - start
        rna = None
        if self._rna is not None:
            hi = min(stop, self.n_rna)
            if hi > start:
                rna = self._rna.X.rows(start, hi)
                if hi < stop:
                    rna = sp.vstack([rna, sp.csr_matrix((stop - hi, rna.shape[1]), dtype=rna.dtype)], format="csr")
            else:
                rna = sp.csr_matrix((n, self._rna.X.n_cols), dtype=np.int32)
        atac = None
        if self._atac is not None:
            pos = self._atac_pos[start:stop]
            have = np.flatnonzero(pos >= 0)
            if len(have) == n and n and np.all(np.diff(pos) == 1):
                atac = self._atac.X.rows(int(pos[0]), int(pos[-1]) + 1)  # same order: one slice
            else:
                atac = scatter_rows(self._atac.X.take(pos[have]), have, n)
        return rna, atac


def _open_pair(cfg: InputConfig) -> PairSource:
    if cfg.rna and cfg.atac and Path(cfg.rna).resolve() == Path(cfg.atac).resolve():
        # built without a word, the genes became the store's peaks
        raise ValueError(f"{cfg.rna}: given as both rna and atac of one h5ad_pair input; a file with genes and "
                         "peaks in one matrix is kind=scvi")
    rna = H5AnnDataGroup(cfg.rna, layer=cfg.layer) if cfg.rna else None
    atac = H5AnnDataGroup(cfg.atac, layer=cfg.layer) if cfg.atac else None
    try:
        for group, role in ((rna, "rna"), (atac, "atac")):
            _check_declared_modality(group, role)
        src = PairSource(rna, atac, name=" + ".join(str(p) for p in (cfg.rna, cfg.atac) if p))
        for group in (rna, atac):
            # a file's own mask columns (a store shard written back as .h5ad lists every cell in both files)
            # narrow what membership says, as an .h5mu's global ones do; they were overwritten without a word
            if group is not None:
                _global_masks(src, group.obs, f"{group.where} obs")
    except BaseException:
        for group in (rna, atac):
            if group is not None:
                group.close()
        raise
    return src


def modality_of(types) -> tuple[np.ndarray, np.ndarray]:
    """(is gene, is peak) per value of a feature-type column: one rule for the genes-then-peaks split and for the
    swapped-pair check. GEX / ATAC: the NeurIPS 2021 multiome .h5ad's feature_types (the names .h5mu reading
    takes too); not "expression", which "Protein Expression" (CITE-seq) also holds."""
    t = pd.Series(types).astype(str).str.lower()
    is_gene = t.str.contains("gene|gex|rna").to_numpy()
    return is_gene, t.str.contains("peak|atac|accessib").to_numpy() & ~is_gene


def _check_declared_modality(group, role: str) -> None:
    """Refuse an AnnData given as ``role`` whose own var column (``feature_types``, scanpy's and 10x's name;
    ``modality``, scvi-tools') names features of the other modality: rna and atac swapped built a store of
    peaks called genes, without a word, and a genes-and-peaks file given as rna= one whose peaks were genes."""
    if group is None or not len(group.var):
        return
    for col in ("feature_types", "modality"):
        if col not in group.var.columns:
            continue
        is_gene, is_peak = modality_of(group.var[col].to_numpy())
        other = is_peak if role == "rna" else is_gene
        if other.any():
            says = "peaks" if role == "rna" else "genes"
            first = group.var[col].iloc[int(np.flatnonzero(other)[0])]
            if other.all():
                raise ValueError(f"{group.where}: given as {role}, but its var[{col!r}] names every feature "
                                 f"{first!r} ({says}): are rna and atac swapped?")
            raise ValueError(f"{group.where}: given as {role}, but its var[{col!r}] names {int(other.sum())} of its "
                             f"{len(other)} features {first!r} ({says}): a file with genes and peaks in one matrix "
                             f"is kind=scvi (split by var[{col!r}]: modality_key={col})")


def _open_h5mu(cfg: InputConfig) -> PairSource:
    from anndata.io import read_elem

    with open_h5(cfg.path) as f:
        if "mod" not in f:
            raise ValueError(f"{cfg.path}: not an .h5mu (no 'mod' group)")
        mods = list(f["mod"].keys())
        extra = read_elem(f["obs"]) if "obs" in f else None
    rna_name = next((m for m in RNA_MOD_NAMES if m in mods), None)
    atac_name = next((m for m in ATAC_MOD_NAMES if m in mods), None)
    if rna_name is None and atac_name is None:
        raise ValueError(f"{cfg.path}: modalities {mods} contain neither RNA {RNA_MOD_NAMES} nor ATAC "
                         f"{ATAC_MOD_NAMES}")
    rna = H5AnnDataGroup(cfg.path, f"mod/{rna_name}", layer=cfg.layer) if rna_name else None
    atac = H5AnnDataGroup(cfg.path, f"mod/{atac_name}", layer=cfg.layer) if atac_name else None
    if extra is not None:
        extra.index = extra.index.astype(str)
        # MuData prefixes modality columns with "<mod>:"; those are already in the modality obs.
        extra = extra[[c for c in extra.columns if ":" not in str(c)]]
    src = PairSource(rna, atac, name=str(cfg.path), extra_obs=extra)
    _global_masks(src, extra, f"{cfg.path}: global obs")
    ignored = [m for m in mods if m not in (rna_name, atac_name)]
    if ignored:  # e.g. ATAC under a name we do not know: the store would silently be RNA-only
        msg = (f"{cfg.path}: modalities {ignored} are not read (RNA is one of {RNA_MOD_NAMES}, ATAC one of "
               f"{ATAC_MOD_NAMES})" + ("" if rna_name and atac_name else
                                       f"; the store gets no {'RNA' if rna_name is None else 'ATAC'} from it"))
        src.warnings = (*src.warnings, msg)
    return src


def _global_masks(src: PairSource, extra: pd.DataFrame | None, where: str) -> None:
    """Honour ``mask_rna`` / ``mask_atac`` columns of an .h5mu's global obs (or of an h5ad_pair file's obs): a
    MuData that lists every cell in both modalities (a store shard, mudata.read_zarr(shard).write(...)) records
    there which it measured, and membership alone made its RNA-only and ATAC-only cells measured in both, with
    empty rows. A cell is measured where it is in the modality's obs and its mask (where it has one) says so."""
    for name in ("mask_rna", "mask_atac"):
        if extra is None or name not in extra.columns:
            continue
        col = extra[name].reindex(src.obs.index)
        have = col.notna().to_numpy()
        measured = np.ones(len(col), bool)
        measured[have] = as_mask(col[have], where, name)
        src.obs[name] = src.obs[name].to_numpy(bool) & measured


def _split_columns(var: pd.DataFrame, types: np.ndarray | None, n_genes: int | None, where: str,
                   modality_key: str = "modality"):
    """Column indices of genes and of peaks in a genes-then-peaks matrix."""
    if types is not None:
        is_gene, is_peak = modality_of(types)
        genes, peaks = np.flatnonzero(is_gene), np.flatnonzero(is_peak)
        other = np.setdiff1d(np.arange(len(is_gene)), np.concatenate([genes, peaks]))
        if len(other):
            raise ValueError(f"{where}: feature {var.index[other[0]]!r} has modality {types[other[0]]!r}, "
                             "expected 'Gene Expression' (or GEX) or 'Peaks' (or ATAC)")
        if n_genes is not None and n_genes != len(genes):  # it was silently ignored: which one did the user mean?
            raise ValueError(f"{where}: n_genes={n_genes}, but var[{modality_key!r}] names {len(genes)} genes; "
                             "leave n_genes unset (the column decides) or fix the column")
        return genes, peaks
    if n_genes is None:
        # name the option: scanpy's read_10x_h5 calls this column feature_types, scvi-tools modality
        guess = [c for c in var.columns if var[c].astype(str).str.lower().str.contains("peak").any()]
        raise ValueError(f"{where}: var has no column {modality_key!r} (modality_key) naming 'Gene Expression' / "
                         f"'Peaks'; set modality_key to the column that does" + (f" (e.g. {guess[0]!r})" if guess else "")
                         + " or n_genes (genes come first in the scvi layout)")
    if not 0 < n_genes <= len(var):
        raise ValueError(f"{where}: n_genes={n_genes} is outside 1..{len(var)}")
    # a wrong n_genes without a modality column split silently; where the peaks are named as regions
    # (chr1-100-200, chr1:100-200, chr1_100_200), a region-named feature among the genes shows it
    names = pd.Series(var.index.astype(str))
    regionlike = names.str.fullmatch(r"(chr)?[0-9A-Za-z]{1,5}[:_-]\d+[_-]\d+", case=False).to_numpy()
    if n_genes < len(var) and regionlike[n_genes:].mean() > 0.9 and regionlike[:n_genes].any():
        k = int(np.flatnonzero(regionlike[:n_genes])[0])
        raise ValueError(f"{where}: n_genes={n_genes} puts {names[k]!r} (column {k}), named like a region, among the "
                         f"genes: the first region is column {int(np.argmax(regionlike))}; fix n_genes or give a "
                         "modality column (modality_key)")
    return np.arange(n_genes), np.arange(n_genes, len(var))


class SplitSource(Source):
    """One matrix whose columns are genes then peaks (scvi-tools layout, 10x ARC .h5)."""

    def __init__(self, name, X, obs, var, genes, peaks, handles):
        self.name, self._X, self._genes, self._peaks, self._handles = name, X, genes, peaks, handles
        self.obs = obs
        self.features = {"rna": var.iloc[genes] if len(genes) else None,
                         "atac": var.iloc[peaks] if len(peaks) else None}

    def _rows(self, start, stop):
        x = self._X.rows(start, stop)
        rna = x[:, self._genes] if len(self._genes) else None
        atac = x[:, self._peaks] if len(self._peaks) else None
        return rna, atac


_TRUE, _FALSE = {"true", "1", "1.0", "yes"}, {"false", "0", "0.0", "no"}


def as_mask(col: pd.Series, where: str, name: str) -> np.ndarray:
    """A modality mask column as bools: bool, 0/1 or true/false text. ``astype(bool)`` would read the
    text "False" (and NaN) as True: a cell without ATAC would become "measured, all zero"."""
    if col.dtype == bool:
        return col.to_numpy()
    text = col.astype(str).str.strip().str.lower()
    ok = text.isin(_TRUE | _FALSE).to_numpy() & ~col.isna().to_numpy()
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"{where}: obs[{name!r}] of cell {col.index[i]!r} is {col.iloc[i]!r}; expected "
                         "True/False (or 1/0)")
    return text.isin(_TRUE).to_numpy()


def _masks_from_obs(obs: pd.DataFrame, where: str) -> pd.DataFrame:
    """Per modality: its ``mask_<mod>`` column, else the scvi-tools ``modality`` column, else measured in
    every cell (the layout's default). One mask column alone still counts: ignoring a lone ``mask_atac``
    stored its RNA-only cells as ATAC-measured with no peaks."""
    obs = obs.copy()
    modality = None
    if "modality" in obs.columns and not {"mask_rna", "mask_atac"} <= set(obs.columns):
        m = obs["modality"].astype(str).str.lower()
        known = m.isin(["paired", "expression", "accessibility"])
        if not known.all():
            raise ValueError(f"{where}: obs['modality'] of cell {obs.index[~known.to_numpy()][0]!r} is "
                             f"{obs['modality'].iloc[np.flatnonzero(~known.to_numpy())[0]]!r}; expected "
                             "paired / expression / accessibility")
        modality = {"mask_rna": m.isin(["paired", "expression"]).to_numpy(),
                    "mask_atac": m.isin(["paired", "accessibility"]).to_numpy()}
    for name in ("mask_rna", "mask_atac"):
        if name in obs.columns:
            obs[name] = as_mask(obs[name], where, name)
        else:
            obs[name] = modality[name] if modality is not None else True
    return obs


def _open_scvi(cfg: InputConfig) -> SplitSource:
    g = H5AnnDataGroup(cfg.path, layer=cfg.layer)
    types = g.var[cfg.modality_key].to_numpy() if cfg.modality_key in g.var.columns else None
    genes, peaks = _split_columns(g.var, types, cfg.n_genes, g.where, cfg.modality_key)
    return SplitSource(str(cfg.path), g.X, _masks_from_obs(g.obs, g.where), g.var, genes, peaks, [g])


def _decode(a: np.ndarray) -> np.ndarray:
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in a], dtype=object)


TENX_DATASETS = ("barcodes", "data", "indices", "indptr", "shape", "features/name", "features/id",
                 "features/feature_type")


def _open_tenx(cfg: InputConfig) -> SplitSource:
    path = Path(cfg.path)
    f = open_h5(path)
    try:  # a refused file is closed: the handle kept it open (and locked on some file systems) until exit
        return _read_tenx(path, f)
    except BaseException:
        f.close()
        raise


def _read_tenx(path: Path, f) -> SplitSource:
    if "matrix" not in f:
        raise ValueError(f"{path}: not a Cell Ranger feature-barcode matrix (no 'matrix' group)")
    m = f["matrix"]
    missing = [k for k in TENX_DATASETS if k not in m]
    if missing:  # a KeyError naming no file; Cell Ranger 2 files hold one group per genome and no features/
        raise ValueError(f"{path}: not a Cell Ranger 3+ / ARC feature-barcode matrix: matrix/ lacks "
                         f"{', '.join(missing)}")
    barcodes = _decode(m["barcodes"][:])
    names = _decode(m["features/name"][:])
    ids = _decode(m["features/id"][:])
    types = _decode(m["features/feature_type"][:])
    n_feat, n_bc = (int(s) for s in m["shape"][:])
    # The matrix is CSC over barcodes (features x barcodes), i.e. CSR over cells: read it as rows.
    X = H5CSRRows(m["data"], m["indices"], m["indptr"], n_feat, f"{path} matrix")
    if X.n_rows != n_bc or len(barcodes) != n_bc:
        raise ValueError(f"{path}: matrix/shape {n_feat}x{n_bc} disagrees with indptr/barcodes")
    # Gene symbols repeat in Cell Ranger references; make them unique with the feature id.
    names = pd.Series(names)
    dup = names.duplicated(keep=False).to_numpy() & (types == "Gene Expression")
    names[dup] = [f"{n}_{i}" for n, i in zip(names[dup], ids[dup])]
    var = pd.DataFrame({"gene_ids": ids, "feature_types": types}, index=pd.Index(names.to_numpy(), dtype=str))
    genes, peaks = _split_columns(var, types, None, str(path))
    obs = pd.DataFrame(index=pd.Index(barcodes, dtype=str))
    obs["mask_rna"] = len(genes) > 0
    obs["mask_atac"] = len(peaks) > 0
    return SplitSource(str(path), X, obs, var, genes, peaks, [f])


OPENERS = {"h5ad_pair": _open_pair, "h5mu": _open_h5mu, "scvi": _open_scvi, "tenx_h5": _open_tenx}


def open_input(cfg: InputConfig) -> Source:
    """Open one input; raise ValueError naming the file when it is missing or of the wrong kind."""
    if cfg.kind not in OPENERS:
        raise ValueError(f"unknown input kind {cfg.kind!r}; expected one of {sorted(OPENERS)}")
    paths = [cfg.rna, cfg.atac] if cfg.kind == "h5ad_pair" else [cfg.path]
    if not any(paths):
        raise ValueError(f"input of kind {cfg.kind!r} needs " + ("rna= and/or atac=" if cfg.kind == "h5ad_pair"
                                                                   else "path="))
    for p in paths:
        if p and Path(p).is_dir():  # e.g. an AnnData / MuData .zarr: "does not exist" would be wrong
            raise ValueError(f"input {p} is a directory; mva-build reads .h5ad, .h5mu and 10x .h5 files (write a "
                             ".zarr AnnData once with anndata.read_zarr(...).write_h5ad(...))")
        if p and not Path(p).is_file():
            raise FileNotFoundError(f"input file {p} does not exist")
    if cfg.layer is not None and cfg.kind == "tenx_h5":
        raise ValueError(f"input {cfg.path}: layer= is for AnnData inputs (h5ad_pair, h5mu, scvi); a 10x .h5 "
                         "holds raw counts only")
    src = OPENERS[cfg.kind](cfg)
    if cfg.layer is not None and not any(getattr(h, "counts", None) == cfg.layer for h in src._handles):
        src.close()  # a misspelt layer would silently read every normalised X (then refused as non-integer)
        raise ValueError(f"input {src.name}: no AnnData has layer {cfg.layer!r}")
    if cfg.id_prefix:  # after the RNA/ATAC cells are matched by their own ids; rows are read by position
        src.obs.index = pd.Index(cfg.id_prefix + src.obs.index.astype(str))
    return src
