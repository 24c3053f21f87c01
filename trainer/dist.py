"""Everything about ranks: process group set-up from the torchrun env, device choice, rank-0 output,
and the collectives the loop needs (sums/counts, one shared stop decision).

A single process without torchrun is world size 1 with no process group, and every helper below
degrades to the identity, so the loop has no ``if distributed`` branches.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from data.typed_config import ConfigError
from trainer.config import DEVICES


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INITS = 0  # process groups this process has joined (a --multirun sweep joins one per member)


def _count_group() -> None:
    global _INITS
    _INITS += 1


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def cuda_index(local_rank: int, n_gpus: int) -> int:
    """The GPU of a rank: its LOCAL_RANK, which must name a visible GPU (torch's own error for more ranks per
    node than GPUs is "invalid device ordinal", naming neither)."""
    if not 0 <= local_rank < n_gpus:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {n_gpus} visible GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
                           f"{n_gpus} process(es) per node (torchrun --nproc_per_node, NPROC_PER_NODE)")
    return local_rank


class DeviceError(ConfigError):
    """The configured device cannot be had here (``device=cuda`` where torch sees no GPU): a one-line refusal."""


def pick_device(want: str, local_rank: int, key: str = "device") -> torch.device:
    """The device of this rank for ``want``: "auto" is the GPU of its LOCAL_RANK where torch sees one, else the
    CPU; "cuda" refuses to fall back (a job sent to a node without a usable GPU would otherwise train for days
    on its CPU); "cpu" stays off the GPUs of a GPU node. ``key``: the setting's name in the messages
    (mva-train's is dist.device)."""
    if want not in DEVICES:
        raise DeviceError(f"{key} must be one of {DEVICES}, got {want!r}")
    has_gpu = torch.cuda.is_available()
    if want == "cuda" and not has_gpu:
        raise DeviceError(f"{key}=cuda but torch sees no GPU here (torch {torch.__version__}, CUDA build: "
                          f"{torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run on a GPU node, or use {key}=auto")
    if want == "cpu" or not has_gpu:
        if has_gpu:  # DeepSpeed picks its accelerator by itself (CUDA here) and would move the model there
            os.environ["DS_ACCELERATOR"] = "cpu"
        return torch.device("cpu")
    torch.cuda.set_device(cuda_index(local_rank, torch.cuda.device_count()))
    return torch.device("cuda", local_rank)


def check_deepspeed_accelerator(device: torch.device) -> None:
    """DeepSpeed picks its accelerator itself and moves the model there: it must be this rank's device."""
    from deepspeed.accelerator import get_accelerator

    if (acc := get_accelerator().device_name()) != device.type:
        raise DeviceError(f"DeepSpeed's accelerator is {acc!r} but this rank runs on {device} (dist.device; "
                          f"DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', 'unset')}): set DS_ACCELERATOR={device.type}")


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> bool:
    """Have the kernel SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG); if ``parent``
    is already gone (this process was re-parented), die now. False where it does not apply (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def die_with_launcher() -> bool:
    """Under torchrun, a rank dies with its launcher (``die_with_parent``).

    torchrun starts every rank in a session of its own, so a SIGKILL of the launcher (OOM killer, `kill -9`
    of the job's process group, a node agent) never reaches the ranks: they went on without it, a rank
    waiting on the launcher's store or on a dead peer sat in a collective for up to ``dist.timeout_s``
    holding the run directory's lock, and a relaunch was refused meanwhile. A killed rank loses nothing
    a resume cannot restore (checkpoints are atomic). False where it does not apply (no torchrun, not Linux).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    return die_with_parent(os.getppid())


class DieWithRank:
    """A DataLoader ``worker_init_fn``: the worker dies with the rank that started it. torch's own watchdog
    compares the worker's parent with the one it saw at start-up, after a spawn's imports: a rank killed
    during those seconds left a worker whose "parent" was already init, alive for hours (seen after a
    review's random kills)."""

    def __init__(self) -> None:
        self.rank_pid = os.getpid()  # taken in the rank, pickled into the spawned worker

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.rank_pid)


def init_distributed(timeout_s: int = 1800, single_group: bool = False, device: str = "auto",
                     device_key: str = "device") -> DistInfo:
    """Join the process group described by torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    gloo on CPU, NCCL on GPU; each rank uses the GPU of its LOCAL_RANK (``device``: see pick_device).
    Idempotent. ``single_group``: create a group of one for a single process too (DeepSpeed needs one).
    Under torchrun a rank dies with its launcher (``die_with_launcher``).
    """
    die_with_launcher()
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    device = pick_device(device, local, device_key)
    if world == 1 and single_group and not tdist.is_initialized():
        # an in-process store: no launcher, port or rendezvous is needed for a group of one; DeepSpeed
        # reads the launcher's variables itself, so a plain `python -m trainer.train` gets them here
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", "29500")):  # (not connected to: the store is in-process)
            os.environ.setdefault(name, value)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=tdist.HashStore(), rank=0,
                                 world_size=1, timeout=datetime.timedelta(seconds=timeout_s),
                                 device_id=device if device.type == "cuda" else None)
    if world > 1 and not tdist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun (scripts/train.sh)")
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = None
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0 or _INITS > 0:
            # The launcher's store still holds an earlier group's addresses under the same keys: after a
            # `torchrun --max-restarts` restart (the previous workers' group) and for the second member of
            # a Hydra --multirun sweep in the same processes (the first member's group, destroyed at its
            # end). New ranks then hang connecting to the old ones (seen with --standalone); a key prefix
            # per restart and per group gives every group a clean slate.
            base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=timeout)
            store = tdist.PrefixStore(f"mva/restart{restart}/group{_INITS}/", base)
        _count_group()
        tdist.init_process_group(backend, timeout=timeout, store=store, rank=rank if store else -1,
                                 world_size=world if store else -1,
                                 device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


# Seconds the main thread sleeps (GIL released) before leaving a gloo group; see cleanup().
GLOO_SETTLE_S = 0.2


def cleanup() -> None:
    """Leave the process group (no collective: a rank may leave while others still work, e.g. rank 0
    drawing a UMAP after the last barrier).

    On gloo the main thread first sleeps briefly with the GIL released, because of a teardown race in
    torch (2.13, measured): a DistributedDataParallel keeps the group's C++ object, and so its two worker
    threads, alive past destroy_process_group (still running at interpreter exit after deleting every DDP
    object and a gc pass), and a worker drops the tensor of the collective it last ran *after* wait() has
    returned to Python, which takes the GIL. When that happens once the interpreter is finalising, the
    thread is torn down inside a destructor: "terminate called without an active exception", SIGABRT, and
    torchrun reports a run that had finished and written everything as failed. A barrier does not prevent
    it (the other worker thread may still hold the earlier collective); letting the workers take the GIL
    now does. Numbers: docs/reliability.md.
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    if tdist.get_backend() == "gloo":
        time.sleep(GLOO_SETTLE_S)
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        # DeepSpeed keeps a clone of the world group (deepspeed.utils.groups) that only its own teardown
        # drops; left behind, the next --multirun member's deepspeed.initialize met the destroyed clone
        # ("Group ... is not registered")
        ds_comm.destroy_process_group()
        return
    tdist.destroy_process_group()


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def get_rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (other ranks would repeat every line world-size times)."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def get_logger(name: str = "trainer") -> logging.Logger:
    """A logger that writes on rank 0 and is silent elsewhere."""
    log = logging.getLogger(f"{name}.rank{get_rank()}")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if get_rank() == 0 else logging.CRITICAL + 1)
    return log


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors.
    if is_distributed() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over ranks (in float64 so validation sums over millions of cells stay exact)."""
    if not values or not is_distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.cpu().tolist(), strict=True)}


def cell_weighted_means(values: dict[str, float], n_cells: int, names: tuple[str, ...],
                        counts: dict[str, int] | None = None) -> dict[str, float]:
    """``values[k]`` for ``k`` in ``names`` (this rank's means over its ``n_cells`` cells) become the means
    over every rank's cells: sums ``n * v`` and the cell count are all-reduced in one float64 collective,
    as validation aggregates. Other keys pass through unchanged; ``counts`` (e.g. store read counters) are
    summed over ranks in the same collective and added. Collective: every rank must call it."""
    counts = counts or {}
    if not is_distributed():
        return {**values, **counts}
    sums = all_reduce_sums({**{k: values[k] * n_cells for k in names if k in values}, "\0cells": float(n_cells),
                            **{f"\1{k}": float(v) for k, v in counts.items()}})
    total = sums.pop("\0cells")
    summed = {k[1:]: int(sums.pop(k)) for k in list(sums) if k.startswith("\1")}
    return {**values, **{k: v / total for k, v in sums.items()}, **summed}


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (used to skip a step everywhere)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shared_decision(flag: bool) -> bool:
    """Rank 0's decision, broadcast, so every rank takes the same branch (e.g. early stopping)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    tdist.broadcast(t, src=0)
    return bool(t.item() > 0)


def check_same_everywhere(value: str, what: str, detail: str = "other cells, features or categories") -> None:
    """Raise StoreError on every rank when ``value`` is not the same on all ranks (naming those that differ;
    ``detail``: what they see differently)."""
    values = gather_objects(value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        from data.store import StoreError

        raise StoreError(f"{what} differs between ranks: rank(s) {differ[:8]} see {detail} than rank 0 "
                         "(a stale node-local copy?); every rank must read the same one")


def gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (small things only: the names of bad loss terms). Collective."""
    if not is_distributed():
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_tensors_(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank, in place. Collective.

    NCCL broadcasts CUDA tensors only: a tensor elsewhere travels through the collective device and back."""
    if not is_distributed():
        return
    device = _collective_device()
    for t in tensors:
        if t.device == device:
            tdist.broadcast(t, src=0)
        else:
            moved = t.to(device)
            tdist.broadcast(moved, src=0)
            t.copy_(moved)


def broadcast_object(obj):
    """Rank 0's Python object on every rank (small things only: paths, step numbers)."""
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
