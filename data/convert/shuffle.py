"""Out-of-core preshuffle: a seeded random cell order across the whole store with bounded memory.

Pass 1 sends every cell of every block to a random bucket (one pickle file per block and bucket on
disk); pass 2 loads one bucket at a time, permutes it in memory and hands it on. With about one bucket
per output shard, memory is one shard's worth of cells and every shard mixes cells of all inputs.
"""

from __future__ import annotations

import pickle
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
            with open(self.dir / f"{b:06d}-{self._k:08d}.pkl", "wb") as fh:
                pickle.dump((rna[sel], atac[sel], obs.iloc[sel]), fh, protocol=5)
        self._k += 1

    def buckets(self) -> Iterator[tuple[sp.csr_matrix, sp.csr_matrix, pd.DataFrame]]:
        """Each non-empty bucket, its cells in a random order; files are deleted as they are read."""
        try:
            files = sorted(self.dir.glob("*.pkl"))
            by_bucket: dict[str, list[Path]] = {}
            for f in files:
                by_bucket.setdefault(f.name.split("-")[0], []).append(f)
            for key in sorted(by_bucket):
                parts = []
                for f in by_bucket[key]:
                    with open(f, "rb") as fh:
                        parts.append(pickle.load(fh))
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
