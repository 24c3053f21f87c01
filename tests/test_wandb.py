"""W&B offline: rank 0 writes a local run holding every logged key and the config; no network.

    .venv/bin/python -m pytest tests/test_wandb.py -q

wandb 0.31 keeps an offline run only in its binary ``run-<id>.wandb`` log (LevelDB-style blocks of
protobuf ``Record``s), so the test reads that file with the protobuf classes wandb ships.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.train_utils import tiny_config, tiny_store
from trainer.train import train

LOGGED = ("loss", "recon_rna", "recon_atac", "kl", "penalty", "adversarial", "classifier", "kl_weight", "lr",
          "grad_norm", "cells_per_s", "data_wait_s", "non_step_s", "mem_rss_mb", "skipped_steps",
          "reconstruction_loss_validation", "elbo_validation")


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run log"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a record header never straddles a block: the tail is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk


@pytest.mark.slow
def test_offline_run_has_the_logged_keys(tmp_path, monkeypatch):
    from wandb.proto import wandb_internal_pb2 as pb

    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables W&B; the config decides here
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    store = tiny_store(tmp_path / "store", n_cells=600)
    # "online" without a key must fall back to offline instead of blocking on a login prompt
    cfg = tiny_config(store, tmp_path / "run", **{"logger.wandb_mode": "online", "logger.tags": ["test"]})
    train(cfg)
    logs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    history, config, tags = set(), set(), set()
    for raw in _records(logs[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
        elif kind == "run":
            config |= {item.key for item in rec.run.config.update}
            tags |= set(rec.run.tags)
    missing = [k for k in LOGGED if k not in history]
    assert not missing, f"keys not logged to W&B: {missing}"
    assert {"data", "model", "optim", "dist", "logger", "run"} <= config and tags == {"test"}


def test_a_resumed_run_drops_the_records_logged_after_its_checkpoint(tmp_path):
    """The killed run logged steps 11-14 after its step-10 checkpoint (and died mid-line); the resumed run
    logs them again, so they must not appear twice."""
    from trainer.metrics import MetricsWriter, read_metrics

    rows = [{"kind": "train", "step": s} for s in (5, 10)] + [{"kind": "validation", "step": 10}] + \
        [{"kind": "train", "step": s} for s in (12, 14)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')
    w = MetricsWriter(tmp_path, enabled=True, resume_step=10)
    w.log({"kind": "train", "step": 12})
    w.close(plot=False)
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == \
        [("train", 5), ("train", 10), ("validation", 10), ("train", 12)]


def _history_steps(log: Path) -> list[int]:
    """The `_step` of every history record in one offline transaction log."""
    from wandb.proto import wandb_internal_pb2 as pb

    steps = []
    for raw in _records(log):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            steps.append(int(json.loads(items["_step"])))
    return steps


@pytest.mark.slow
def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    """Every attempt of a run (here a max_steps stop, then a longer resume) opened a W&B run with a new id
    under the same name, so a preempted-and-resumed run showed up as several runs. Now the id is kept in
    the run directory: offline, each attempt writes its own offline-run-*-<id> directory with that one id
    (`wandb sync` merges them into one run), and the steps continue."""
    monkeypatch.setenv("WANDB_MODE", "offline")  # the test's own mode, no network
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    store = tiny_store(tmp_path / "store", n_cells=400)
    run = tmp_path / "run"
    opts = {"logger.wandb_mode": "offline", "logger.log_every": 1, "run.epochs": 1}
    train(tiny_config(store, run, **opts, **{"run.max_steps": 3}))
    train(tiny_config(store, run, **opts))  # resumes from the step-3 checkpoint and finishes the epoch
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and logs[0].name == logs[1].name, f"two W&B runs: {[p.name for p in logs]}"
    assert logs[0].name == f"run-{(run / 'wandb_run_id').read_text().strip()}.wandb"
    first, second = (_history_steps(p) for p in logs)
    assert first[:3] == [1, 2, 3] and min(second) == 4 and second == sorted(second), (first, second)


def test_the_wandb_run_id_is_kept_for_a_resume_and_renewed_by_a_fresh_start(tmp_path):
    from trainer.metrics import WANDB_ID_FILE, wandb_run_id

    first = wandb_run_id(tmp_path, continuing=False)
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == first
    assert wandb_run_id(tmp_path, continuing=True) == first  # a resume logs into the same W&B run
    fresh = wandb_run_id(tmp_path, continuing=False)  # resume=none / no checkpoint yet: records dropped
    assert fresh != first and wandb_run_id(tmp_path, continuing=True) == fresh
    assert not list(tmp_path.glob("*.tmp"))


def test_online_with_a_key_but_no_reachable_server_falls_back_to_offline(tmp_path, monkeypatch):
    """With WANDB_API_KEY set and the W&B server unreachable (a compute node without internet access),
    wandb.init waited its init_timeout (90 s by default) and then raised CommError: the training run died
    at start-up. It now logs offline instead, as online without a key does."""
    from trainer.metrics import MetricsWriter, read_metrics

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: connection refused
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")  # keep the test short (the default would wait 90 s)
    w = MetricsWriter(tmp_path, enabled=True, wandb_mode="online", config={"a": 1}, resume_step=0)
    w.log({"kind": "train", "step": 1, "loss": 1.5})
    w.close(plot=False)
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.5]
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1 and _history_steps(logs[0]) == [1]
