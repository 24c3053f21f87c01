"""Real 2-process torchrun (gloo) runs of the trainer.

    .venv/bin/python -m pytest tests/test_ddp.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import PY, ROOT, env, tiny_overrides, tiny_store, torchrun, train_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_two_process_ddp_equals_one_process_on_concatenated_batch(tmp_path, mode):
    """Every step of a whole epoch, the last included: 335 training cells at 2 x 32 leave 15, so the ranks'
    last batches hold 7 and 8 cells. DDP's plain average of the two ranks' means weighed rank 0's cells
    8/7 of rank 1's in that step, and its noise was drawn for 2 x 7 cells, not 15 (fixed by
    trainer/global_batch.py). ``zero2``: the same 2 processes under DeepSpeed ZeRO 2 (fp32)."""
    store = tiny_store(tmp_path / "store", n_cells=360)
    worker = str(ROOT / "tests" / "workers" / "ddp_steps.py")
    torchrun([worker, str(store), str(tmp_path), mode, "epoch"])
    import subprocess

    subprocess.run([PY, worker, str(store), str(tmp_path), "concat", "epoch"], cwd=ROOT, env=env(), check=True,
                   capture_output=True)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes[:-1] == [[32, 32]] * (len(sizes) - 1) and sizes[-1] == [7, 8], sizes  # the uneven step is there
    start = load_file(str(tmp_path / "concat_step0.safetensors"))
    for step in range(len(sizes)):
        a = load_file(str(tmp_path / f"{mode}_step{step}.safetensors"))
        b = load_file(str(tmp_path / f"concat_step{step}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=f"{k} differs after step {step}")
    moved = max(float((b[k] - start[k]).abs().max()) for k in b)
    assert moved > 1e-3, "weights did not move: the comparison would be vacuous"


def test_the_guard_skips_a_bad_step_of_one_rank_on_every_rank(tmp_path):
    """Rank 1 alone gets a NaN loss (step 1), then a NaN gradient with a finite loss (step 3): both ranks
    skip both steps and count them, their weights stay equal and finite, and the good steps around move
    them (a rank skipping its backward alone would leave the other waiting in DDP's all-reduce)."""
    store = tiny_store(tmp_path / "store")
    torchrun([str(ROOT / "tests" / "workers" / "guard_ranks.py"), str(store), str(tmp_path / "out"), "ddp"], nproc=2)
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text())["ddp"] for r in (0, 1)]
    for r in ranks:
        assert [s["skipped"] for s in r["steps"]] == [False, True, False, True, False], r["steps"]
        assert [s["unchanged"] for s in r["steps"]] == [False, True, False, True, False], r["steps"]
        assert r["skipped_total"] == 2 and r["nan_params"] == 0, r
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the ranks stayed in step


def test_early_stopping_under_ddp_stops_all_ranks_at_the_same_epoch(tmp_path):
    store = tiny_store(tmp_path / "store")
    out = tmp_path / "run"
    # min_delta huge: epoch 0 sets the best, epoch 1 cannot improve -> patience 1 stops after epoch 1
    ov = tiny_overrides(store, out, **{"run.epochs": 6, "run.patience": 1, "run.min_delta": 1e9})
    res = train_cli(ov, nproc=2)
    log = res.stdout + res.stderr
    finished = sorted(line for line in log.splitlines() if "finished at epoch" in line)
    assert len(finished) == 2, log[-2000:]
    assert all("finished at epoch 2 " in line for line in finished), finished
    result = json.loads((out / "result.json").read_text())
    assert result["epochs"] == 2 and result["stopped"] and result["world_size"] == 2
    vals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "validation" for r in vals) == 2
    # exact validation aggregation: the cell count summed over ranks is the whole validation split
    from data.store import open_store
    from data.stream import StoreStream

    n_val = sum(b["index"].shape[0] for b in StoreStream(open_store(store), 64, split="validation", shuffle=False))
    assert result["validation"]["n_validation"] == n_val


def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(tmp_path):
    """Kill one worker (SIGKILL) after a mid-epoch checkpoint: torchrun restarts the group and the
    new workers continue from that checkpoint (resume=auto) to the end."""
    import signal
    import subprocess
    import time

    import psutil

    from tests.train_utils import as_cli

    store = tiny_store(tmp_path / "store")
    out = tmp_path / "run"
    ov = tiny_overrides(store, out, **{"run.epochs": 4, "run.checkpoint_every_steps": 3})
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "trainer.train", *as_cli(ov)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob("step_*")):
        time.sleep(0.02)
    victim = [p for p in psutil.Process(launcher.pid).children(recursive=True)
              if p.environ().get("LOCAL_RANK") == "1"]
    assert victim, "no rank-1 worker found"
    victim[0].send_signal(signal.SIGKILL)
    log, _ = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, log[-3000:]
    assert "resumed from" in log, log[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["epochs"] == 4 and result["world_size"] == 2


def test_ranks_reading_different_copies_of_the_store_are_refused(tmp_path):
    """On a cluster each node may read its own copy of data.store: a stale copy on one node trained silently
    on mixed cells. Rank 1 reads another build (same cell ids, features and categories, other counts): every
    rank stops at start-up naming it, long before dist.timeout_s."""
    import subprocess
    import time

    from tests.train_utils import PY, ROOT, as_cli, env, tiny_overrides, tiny_store

    a, b = tiny_store(tmp_path / "a", n_cells=300), tiny_store(tmp_path / "b", n_cells=300, seed=1)
    ov = tiny_overrides(a, tmp_path / "run", **{"run.epochs": 1, "dist.timeout_s": 600})
    del ov["data"]["store"]
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.train",
           *as_cli(ov), "data.store='${oc.env:MVA_TEST_STORE_${oc.env:LOCAL_RANK}}'"]  # each rank its own copy
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env={**env(), "MVA_TEST_STORE_0": str(a), "MVA_TEST_STORE_1": str(b)},
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode != 0 and time.time() - t0 < 200, (r.stdout + r.stderr)[-3000:]
    assert "differs between ranks: rank(s) [1] see other cells" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "run" / "model").exists()
