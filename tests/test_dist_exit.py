"""Leaving a gloo group after DDP must not leave a worker thread holding a Python tensor.

A finished 2-rank run once exited with SIGABRT ("terminate called without an active exception") after
writing everything: a gloo worker thread dropped the last collective's tensor during interpreter
finalisation (trainer/dist.py, cleanup). The worker joins a group 12 times per rank and counts the rounds
where the tensor is still held after leaving; without cleanup's settle that is about 1 round in 3.

    .venv/bin/python -m pytest tests/test_dist_exit.py -q
"""

from __future__ import annotations

import json

import pytest

from tests.train_utils import ROOT, torchrun

pytestmark = pytest.mark.slow

WORKER = str(ROOT / "tests" / "workers" / "exit_after_collectives.py")


def test_ranks_leave_a_ddp_group_with_no_tensor_held_and_exit_cleanly():
    res = torchrun([WORKER, "12", "cleanup"])  # raises on a non-zero exit (an abort at exit is -6)
    assert "terminate called" not in res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert sorted(x["rank"] for x in lines) == [0, 1]
    for x in lines:
        assert x["rounds"] == 12
        assert x["held_after_leaving"] == 0, x
