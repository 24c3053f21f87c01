"""de / da sampling: seeded draws of a comparison side's cells, read in bounded groups and decoded.

``Sampler`` draws ``de.n_samples_overall`` cells per side (per batch with batch correction) by a seeded
pure function of (seed, comparison, side), reads only those cells from the store and decodes them
one block of features at a time. ``read_groups`` bounds how many loader chunks one read keeps
resident. Used by ``trainer.jobs.de``.
"""

from __future__ import annotations

import numpy as np
import torch

from data.plan import chunk_bounds
from data.stream import StoreStream
from trainer import differential as D
from trainer.infer_config import InferConfig
from trainer.predict import latent, normalized_expression

READ_CHUNK = 256  # rows per read chunk for the sampled cells (fixed; independent of the store-dependent stream default)
MAX_READ_CHUNKS = 64  # reader chunks resident per read of sampled cells (memory: 64 x 256 rows of counts)
HEAD_ROWS = 4096  # samples per output-layer product (da): caps its temporaries


class Sampler:
    """Decoded scales of one comparison side's sampled cells, for one block of features at a time."""

    def __init__(self, module, stream: StoreStream, job: str, cells: np.ndarray, cfg: InferConfig, key: str):
        o, self.module, self.stream, self.job, self.bs = cfg.de, module, stream, job, cfg.batch_size
        self.seed = cfg.seed
        self.key = key
        # the loader's chunks (restarting at every shard): what one read keeps resident
        self.chunk_starts = chunk_bounds(stream.shard_sizes, stream.chunk_size)[0]
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
            for rows in read_groups(uniq, self.bs, self.chunk_starts):
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
        for c, rows in enumerate(read_groups(cells[order], self.bs, self.chunk_starts)):
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


def read_groups(sorted_cells: np.ndarray, batch_size: int, chunk_starts: np.ndarray,
                max_chunks: int = MAX_READ_CHUNKS) -> list[slice]:
    """Consecutive slices of sorted cell ids, each at most ``batch_size`` cells touching at most
    ``max_chunks`` reader chunks (``chunk_starts``: the loader's, ``data.plan.chunk_bounds``): the loader
    keeps every chunk of one read resident, so scattered samples read in plain batches would hold
    ~batch_size chunks (GBs with many features). Counting ``row // chunk`` over the whole store missed
    that chunks restart at every shard (with 300-cell shards a read held twice the bound)."""
    out, lo, n = [], 0, len(sorted_cells)
    chunk = np.searchsorted(chunk_starts, sorted_cells, side="right") - 1
    while lo < n:
        hi = min(lo + batch_size, n)
        # the last position whose chunk is within max_chunks distinct chunks of lo's
        distinct = np.flatnonzero(np.diff(chunk[lo:hi])) + 1  # starts of new chunks within [lo, hi)
        if len(distinct) >= max_chunks:
            hi = lo + int(distinct[max_chunks - 1])
        out.append(slice(lo, hi))
        lo = hi
    return out
