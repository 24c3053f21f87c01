"""Out-of-core preshuffle: a seeded random cell order across the whole store with bounded memory.

Pass 1 sends every cell of every block to a random bucket (per block and bucket: two ``.npz``
CSR files and one Parquet obs file on disk, never pickles, so a tampered spill directory cannot run
code); pass 2 loads one bucket at a time, permutes it in memory and hands it on. With about one bucket
per output shard, memory is one shard's worth of cells and every shard mixes cells of all inputs.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp


class BucketShuffler:
    def __init__(self, n_buckets: int, seed: int, workdir: str | Path | None = None):
        self.n_buckets = max(1, int(n_buckets))
        self.rng = np.random.default_rng([seed, 7])
        self.dir = Path(tempfile.mkdtemp(prefix="mva-shuffle-", dir=workdir))
        self._k = 0

    def add(self, rna: sp.csr_matrix, atac: sp.csr_matrix, obs: pd.DataFrame) -> None:
        bucket = self.rng.integers(0, self.n_buckets, len(obs))
        for b in np.unique(bucket):
            sel = np.flatnonzero(bucket == b)
            stem = self.dir / f"{b:06d}-{self._k:08d}"
            sp.save_npz(f"{stem}.rna.npz", rna[sel].tocsr(), compressed=False)
            sp.save_npz(f"{stem}.atac.npz", atac[sel].tocsr(), compressed=False)
            obs.iloc[sel].to_parquet(f"{stem}.obs.parquet")  # keeps categories, dtypes and the index
        self._k += 1

    def buckets(self) -> Iterator[tuple[sp.csr_matrix, sp.csr_matrix, pd.DataFrame]]:
        """Each non-empty bucket, its cells in a random order; files are deleted as they are read."""
        try:
            stems = sorted(str(f)[: -len(".obs.parquet")] for f in self.dir.glob("*.obs.parquet"))
            by_bucket: dict[str, list[str]] = {}
            for stem in stems:
                by_bucket.setdefault(Path(stem).name.split("-")[0], []).append(stem)
            for key in sorted(by_bucket):
                parts = []
                for stem in by_bucket[key]:
                    files = [Path(f"{stem}.rna.npz"), Path(f"{stem}.atac.npz"), Path(f"{stem}.obs.parquet")]
                    parts.append((sp.load_npz(files[0]), sp.load_npz(files[1]), pd.read_parquet(files[2])))
                    for f in files:
                        f.unlink()
                rna = sp.vstack([p[0] for p in parts], format="csr")
                atac = sp.vstack([p[1] for p in parts], format="csr")
                obs = pd.concat([p[2] for p in parts])
                perm = self.rng.permutation(len(obs))
                yield rna[perm], atac[perm], obs.iloc[perm]
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
