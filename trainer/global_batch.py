"""Where this rank's batch sits in the step's global batch.

A step of N ranks must equal one process's step on the concatenation of the ranks' batches (rank order):
the same reparameterisation noise per cell and the same gradient. Both need the global batch, and every
rank knows it without communication: the batch sizes of every rank at every step are a pure function of
the epoch's cell count (``data.plan.step_sizes``).

With equal batches (every step of ``drop`` and ``pad``, all but the last of ``even``) the ranks' average of
their mean losses, which DDP, DeepSpeed and the classifier's all-reduce take, already is the mean over the
global batch. When ``even`` leaves the ranks' last batches one cell apart, each rank's mean is weighted by
``share = size * world_size / total`` before that average, so a cell weighs ``1 / total`` wherever it is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from data.plan import step_sizes


@dataclass(frozen=True)
class RankSlice:
    offset: int  # cells of the lower ranks in this step's global batch
    size: int  # this rank's cells
    total: int  # the global batch: every rank's cells
    world_size: int

    @property
    def share(self) -> float | None:
        """The factor on this rank's mean loss (None: exactly 1, the loss is left untouched)."""
        if self.size * self.world_size == self.total:
            return None
        return self.size * self.world_size / self.total


class EpochSlices:
    """The slices of every step of one epoch for one rank (a ``(steps, world_size)`` table, tiny)."""

    def __init__(self, n_cells: int, *, batch_size: int, rank: int, world_size: int, remainder: str):
        self.rank, self.world_size = rank, world_size
        self.sizes = step_sizes(n_cells, batch_size=batch_size, world_size=world_size, remainder=remainder)

    @classmethod
    def of_stream(cls, stream) -> EpochSlices:
        """The table of a training ``StoreStream``'s current epoch."""
        return cls(stream.plan().n_cells, batch_size=stream.batch_size, rank=stream.rank,
                   world_size=stream.world_size, remainder=stream.remainder)

    def at(self, position: int, got: int) -> RankSlice:
        """The slice of the epoch's ``position``-th step, whose batch had ``got`` cells on this rank.

        A batch of another size than the plan's would silently break the averaging (and equal-size
        collectives elsewhere), so it is an error, not a fallback."""
        if not 0 <= position < len(self.sizes) or self.sizes[position, self.rank] != got:
            planned = int(self.sizes[position, self.rank]) if 0 <= position < len(self.sizes) else None
            raise RuntimeError(f"rank {self.rank}: step {position} of the epoch got {got} cells, the plan says "
                               f"{planned} (of {len(self.sizes)} steps): the stream and the plan disagree")
        row = self.sizes[position]
        return RankSlice(offset=int(row[:self.rank].sum()), size=got, total=int(row.sum()),
                         world_size=self.world_size)


def step_noise(seed: int, step: int, offset: int, size: int, total: int, n_noise: int,
               device: torch.device) -> torch.Tensor:
    """Reparameterisation noise (``n_noise`` columns: ``MultiVAE.n_noise``, z's and a lognormal library's) for this
    rank's slice ``[offset, offset + size)`` of the GLOBAL batch of step ``step`` (``total`` cells over all ranks).

    Drawn from a generator keyed by (seed, step) only, so N ranks draw exactly what one process with the
    concatenated batch draws: a 2-process run then equals a 1-process run on the concatenated batch, and
    a resumed run draws what the uninterrupted one drew.
    """
    key = int.from_bytes(hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest(), "little")
    g = torch.Generator().manual_seed(key % 2**63)
    eps = torch.randn(total, n_noise, generator=g)
    return eps[offset:offset + size].to(device)
