"""Shared pytest set-up. One torch thread: on this 2-core VM two intra-op threads are ~10x slower."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

torch.set_num_threads(1)

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Re-pin one intra-op thread before every test: some libraries change it in-process
    (scanpy.pp.neighbors -> numba/pynndescent leaves torch at 2 threads), and a different thread count
    changes reduction order, so an in-process run would no longer equal a 1-thread subprocess run bit
    for bit (seen: the SIGKILL-resume test failed after the embed test in the same session)."""
    torch.set_num_threads(1)
    yield
