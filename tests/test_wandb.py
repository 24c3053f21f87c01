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
          "grad_norm", "cells_per_s", "data_wait_s", "mem_rss_mb", "skipped_steps",
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
