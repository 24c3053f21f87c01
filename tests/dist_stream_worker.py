"""Launched by tests/test_stream_torchrun.py under ``torchrun``: each rank streams one epoch of a store.

Every batch goes through an all-reduce, as a DDP step would, so unequal batch counts across ranks fail
here the same way they fail in training. Each rank writes the cell indices it saw to ``<out>/rank<r>.npy``
and its batch count to ``<out>/rank<r>.json``.
Usage: torchrun --standalone --nproc_per_node=2 tests/dist_stream_worker.py STORE OUT BATCH_SIZE SPLIT
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from data import keys
from data.stream import StoreStream


def main() -> None:
    store, out, batch_size, split = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    stream = StoreStream(store, batch_size, split=split, shuffle=split != "all", seed=11, rank=rank,
                         world_size=world)
    stream.set_epoch(1)
    seen, n_batches = [], 0
    for batch in stream:
        if split == "train":
            total = torch.tensor([len(batch[keys.INDEX])], dtype=torch.int64)
            dist.all_reduce(total)  # a rank with fewer batches would leave this collective unmatched
        seen.append(batch[keys.INDEX].numpy())
        n_batches += 1
    np.save(os.path.join(out, f"rank{rank}.npy"), np.concatenate(seen) if seen else np.zeros(0, np.int64))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": world, "n_batches": n_batches, "len": len(stream),
                   "n_dropped": stream.plan().n_dropped}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
