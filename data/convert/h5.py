"""Row-block access to count matrices inside HDF5 files (.h5ad, .h5mu modalities, 10x .h5).

Everything here reads with h5py: the CSR ``indptr`` (n_cells + 1 integers) is held in memory and the
``data`` / ``indices`` of a block are read as one slice, so memory is bounded by the block, whatever
the file size. Arbitrary row sets (needed when two files order their cells differently) are read as
runs of consecutive rows.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem


def _scipy_values(a: np.ndarray) -> np.ndarray:
    """Values scipy.sparse takes: it has no float16 (its error named neither the file nor the matrix);
    float32 holds every float16 value exactly, so the integer check that follows sees the file's values."""
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _scipy_dtype(dt: np.dtype) -> np.dtype:
    return np.dtype(np.float32) if dt == np.float16 else dt


class H5CSRRows:
    """CSR rows of an on-disk matrix given its ``data``, ``indices`` and ``indptr`` datasets."""

    def __init__(self, data: h5py.Dataset, indices: h5py.Dataset, indptr: h5py.Dataset, n_cols: int,
                 where: str):
        self.data, self.indices = data, indices
        self.indptr = np.asarray(indptr[:], dtype=np.int64)
        self.n_rows, self.n_cols, self.where = len(self.indptr) - 1, int(n_cols), where

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return sp.csr_matrix((_scipy_values(self.data[lo:hi]), self.indices[lo:hi], self.indptr[start:stop + 1] - lo),
                             shape=(stop - start, self.n_cols))

    def take(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows in the given order (any order; consecutive runs are read in one slice each)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return sp.csr_matrix((0, self.n_cols), dtype=_scipy_dtype(self.data.dtype))
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        breaks = np.flatnonzero(np.diff(srt) != 1) + 1
        parts = [self.rows(int(r[0]), int(r[-1]) + 1) for r in np.split(srt, breaks)]
        got = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        return got[inv] if not np.array_equal(order, np.arange(len(order))) else got


class H5DenseRows:
    """Dense 2-D dataset read in row blocks and returned as CSR."""

    def __init__(self, ds: h5py.Dataset, where: str):
        self.ds, self.n_rows, self.n_cols, self.where = ds, ds.shape[0], ds.shape[1], where

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(_scipy_values(self.ds[start:stop]))

    def take(self, rows: np.ndarray) -> sp.csr_matrix:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return sp.csr_matrix((0, self.n_cols), dtype=_scipy_dtype(self.ds.dtype))
        uniq, inv = np.unique(rows, return_inverse=True)  # h5py wants increasing indices
        return sp.csr_matrix(_scipy_values(self.ds[uniq][inv]))


def matrix_rows(x: h5py.Group | h5py.Dataset, where: str, name: str = "X") -> H5CSRRows | H5DenseRows:
    """Row reader for an AnnData-encoded matrix (CSR group or dense dataset); ``name`` is how errors call it
    (``X``, ``layers['counts']``): the fix for a CSC layer is on the layer, not on X."""
    if isinstance(x, h5py.Dataset):
        if x.ndim != 2:
            raise ValueError(f"{where}: {name} has {x.ndim} dimensions, expected 2")
        return H5DenseRows(x, where)
    enc = x.attrs.get("encoding-type", "")
    shape = tuple(int(s) for s in x.attrs.get("shape", (0, 0)))
    if enc == "csr_matrix":
        return H5CSRRows(x["data"], x["indices"], x["indptr"], shape[1], where)
    if enc == "csc_matrix":
        raise ValueError(f"{where}: {name} is stored as CSC; row blocks need CSR. Convert once with "
                         f"adata.{name} = adata.{name}.tocsr() and write the file again")
    raise ValueError(f"{where}: unsupported {name} encoding {enc!r}")


def open_h5(path: str | Path) -> h5py.File:
    """``h5py.File(path, "r")``, with the path in the error: h5py's own message does not name the file."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise OSError(f"{path}: cannot be read as HDF5 (.h5ad / .h5mu / 10x .h5): {exc}") from exc


RAW_LAYER = "raw.X"  # layer= value naming AnnData.raw: its X, with raw's own var (CELLxGENE and SeuratDisk keep
# the counts there, X normalised; after an HVG subset raw also holds the genes X dropped)


class H5AnnDataGroup:
    """An AnnData stored in an HDF5 group (an .h5ad root, or ``mod/<name>`` of an .h5mu)."""

    def __init__(self, file: str | Path, group: str = "/", layer: str | None = None):
        self.file = Path(file)
        self.where = f"{self.file}" + ("" if group == "/" else f":{group}")
        self._h5 = open_h5(self.file)
        g = self._h5[group]
        if "mod" in g:  # an .h5mu's root also has obs and var (and no X)
            self._h5.close()
            raise ValueError(f"{self.where}: is a MuData (.h5mu), not an AnnData; give it as kind: h5mu, path: ...")
        # X may be absent: anndata writes no X for adata.X = None (counts kept in a layer only)
        missing = [k for k in ("obs", "var") if k not in g]
        if missing:
            self._h5.close()
            raise ValueError(f"{self.where}: not an AnnData: no {' / '.join(missing)}")
        raw = layer == RAW_LAYER and "raw" in g and "X" in g["raw"] and "var" in g["raw"]
        self.obs: pd.DataFrame = read_elem(g["obs"])
        self.var: pd.DataFrame = read_elem(g["raw"]["var"] if raw else g["var"])
        if not isinstance(self.obs, pd.DataFrame) or not isinstance(self.var, pd.DataFrame):
            # anndata < 0.7 wrote obs/var as HDF5 tables (and X with h5sparse attributes); anndata still reads
            # them in memory, the out-of-core reader here does not
            self._h5.close()
            raise ValueError(  # noqa: TRY004 -- a bad input file (one line from mva-build), not a caller bug
                f"{self.where}: an .h5ad of anndata < 0.7 (obs/var stored as tables): rewrite it once "
                "with anndata.read_h5ad(path).write_h5ad(new_path) and give the new file")
        self.obs.index = self.obs.index.astype(str)
        self.var.index = self.var.index.astype(str)
        # the raw counts: layers/<layer> where this AnnData has it (X normalised in place, as scanpy leaves
        # it; typically only the RNA side of an input), else X (still checked to hold integer counts)
        self.counts = RAW_LAYER if raw else layer if layer is not None and "layers" in g and layer in g["layers"] else "X"
        if self.counts == "X" and "X" not in g:
            layers = list(g["layers"].keys()) if "layers" in g else []
            layers += [RAW_LAYER] if "raw" in g else []
            self._h5.close()
            raise ValueError(f"{self.where}: no X (written with X=None)" + (
                f"; its layers are {layers}: set the input's layer=<name> to the one holding the raw counts"
                if layers else " and no layers: it holds no counts"))
        name = {"X": "X", RAW_LAYER: RAW_LAYER}.get(self.counts, f"layers[{layer!r}]")
        x = g["X"] if self.counts == "X" else g["raw"]["X"] if raw else g["layers"][layer]
        self.X = matrix_rows(x, self.where, name)
        if (self.X.n_rows, self.X.n_cols) != (len(self.obs), len(self.var)):
            raise ValueError(f"{self.where}: {name} shape {(self.X.n_rows, self.X.n_cols)} does not match "
                             f"obs ({len(self.obs)}) x var ({len(self.var)})")

    def close(self) -> None:
        self._h5.close()

