"""Worker for tests/test_dist_exit.py: join a gloo group ROUNDS times in one process; each time build a
DistributedDataParallel (it keeps gloo's worker threads alive past destroy_process_group), run one
collective on a Python tensor, leave through ``trainer.dist.cleanup`` and count the references to that
tensor. A gloo worker that still holds it after the group is left would drop it later by taking the GIL,
and at interpreter exit that aborts the process (SIGABRT). Prints one JSON line per rank.

    torchrun --standalone --nproc_per_node=2 tests/workers/exit_after_collectives.py ROUNDS cleanup

``bare`` instead of ``cleanup`` calls ``destroy_process_group`` alone (what cleanup did before; for
measuring). The main thread keeps the GIL between blocking calls (switch interval 30 s), so a worker
gets it only when the main thread blocks or sleeps, as it would be under load.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as tdist

from trainer import dist


def main(rounds: int, mode: str) -> None:
    sys.setswitchinterval(30)
    held_after_collective, held_after_leaving = 0, 0
    for _ in range(rounds):
        info = dist.init_distributed(timeout_s=120)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        t = torch.ones(1)
        tdist.all_reduce(t)
        # 2 = this name + getrefcount's argument; a third is the C++ side (a gloo worker still holding it)
        held_after_collective += sys.getrefcount(t) > 2
        if mode == "cleanup":
            dist.cleanup()
        else:
            tdist.destroy_process_group()
        held_after_leaving += sys.getrefcount(t) > 2
        del ddp
    line = json.dumps({"rank": info.rank, "rounds": rounds, "held_after_collective": held_after_collective,
                       "held_after_leaving": held_after_leaving}) + "\n"
    os.write(1, line.encode())  # one write: under `python -u` print() splits it and the two ranks' lines interleave


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
