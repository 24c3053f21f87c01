"""W&B offline: rank 0 writes a local run holding every logged key and the config; no network.

    .venv/bin/python -m pytest tests/test_wandb.py -q

wandb 0.31 keeps an offline run only in its binary ``run-<id>.wandb`` log (LevelDB-style blocks of
protobuf ``Record``s), so the test reads that file with the protobuf classes wandb ships. A run that is not
the process's first may return from ``finish()`` before that log is written out (seen: 0 records right after
``close``, all of them a second later), so the tests shut wandb down (``_offline_logs``) before reading.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from tests.train_utils import tiny_config, tiny_store
from trainer.train import train

LOGGED = ("step", "epoch", "loss", "recon_rna", "recon_atac", "kl", "penalty", "adversarial", "classifier", "kl_weight", "lr",
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


def _offline_logs(run_dir: Path) -> list[Path]:
    """The offline transaction logs of a run directory, oldest attempt first, once wandb has written them
    out: ``wandb.teardown()`` waits for its service process to finish every run."""
    import wandb

    wandb.teardown()
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def _parsed(log: Path):
    """(record type, record) of every record of one offline transaction log."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in _records(log):
        rec = pb.Record()
        rec.ParseFromString(raw)
        yield rec.WhichOneof("record_type"), rec


def _history(log: Path) -> list[dict]:
    """The rows of one offline transaction log, as {key: value}."""
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            for kind, rec in _parsed(log) if kind == "history"]


@pytest.mark.slow
def test_offline_run_has_the_logged_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables W&B; the config decides here
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    store = tiny_store(tmp_path / "store", n_cells=600)
    # "online" without a key must fall back to offline instead of blocking on a login prompt
    cfg = tiny_config(store, tmp_path / "run", **{"logger.wandb_mode": "online", "logger.tags": ["test"]})
    train(cfg)
    logs = _offline_logs(tmp_path / "run")
    assert len(logs) == 1
    history, config, tags = set(), set(), set()
    for kind, rec in _parsed(logs[0]):
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
    """The training step (``step``, the charts' x axis) of every row of one offline transaction log."""
    return [int(row["step"]) for row in _history(log)]


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
    logs = _offline_logs(run)
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
    logs = _offline_logs(tmp_path)
    assert len(logs) == 1 and _history_steps(logs[0]) == [1]


def _emulate_the_servers_resume(monkeypatch, last_row: int) -> None:
    """Make the next wandb.init start its run after row ``last_row``, as W&B's server does for an online
    resume (its answer sets the run's ``starting_step`` to the resumed run's last ``_step`` + 1). Offline,
    wandb does not resume, and every attempt starts a run of its own at row 0, where nothing is dropped."""
    from wandb.sdk.interface.interface import InterfaceBase

    make_run = InterfaceBase._make_run

    def resumed(self, run):
        record = make_run(self, run)
        record.starting_step = last_row + 1
        return record

    monkeypatch.setattr(InterfaceBase, "_make_run", resumed)


def _train_record(step: int, loss: float) -> dict:
    return {"kind": "train", "step": step, "epoch": 0, "loss": loss, "lr": 1e-3, "best": None}


def _after_this_second(t: float) -> None:
    """Wait for the wall clock's next second after ``t``: an offline run's directory is named by its start
    second and run id, so two attempts of one run id started in one second would share it."""
    while int(time.time()) == int(t):
        time.sleep(0.05)


def test_a_resumed_run_keeps_the_steps_it_logs_again(tmp_path, monkeypatch):
    """An attempt killed after step 10 resumes from its step-5 checkpoint and logs steps 6-10 again (the
    steps that made the final weights). The W&B run it resumes is past them already, and with
    ``wandb.log(..., step=step)`` W&B dropped every one of them ("Tried to log to step 6 that is less than
    the current step 11 ... this data will be ignored"), while metrics.jsonl held them. Now the training
    step is a metric of each row (``step``, the charts' x axis, by define_metric), and every row is kept.
    Offline W&B does not resume, so the server's answer to the resumed attempt is emulated."""
    from trainer.metrics import MetricsWriter, read_metrics

    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables W&B; the writer's mode decides here
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    opts = {"enabled": True, "wandb_mode": "offline", "config": {"model": {"n_latent": 6}}}
    first = MetricsWriter(tmp_path, **opts, resume_step=0)
    started = time.time()
    for s in range(1, 11):
        first.log(_train_record(s, float(s)))
    first.close(plot=False)
    (killed,) = _offline_logs(tmp_path)
    _emulate_the_servers_resume(monkeypatch, max(row["_step"] for row in _history(killed)))
    _after_this_second(started)
    resumed = MetricsWriter(tmp_path, **opts, resume_step=5)  # as the trainer does from the step-5 checkpoint
    for s in range(6, 11):
        resumed.log(_train_record(s, 100.0 + s))
    resumed.close(plot=False)

    logs = _offline_logs(tmp_path)
    assert len(logs) == 2 and logs[0] == killed and logs[1].name == killed.name, logs
    relogged = {row["step"]: row["loss"] for row in _history(logs[1])}
    assert relogged == {s: 100.0 + s for s in range(6, 11)}, f"re-logged steps dropped by W&B: {relogged}"
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == \
        [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 11)]
    for log in logs:  # every attempt: its charts against the training step, the config, every numeric key
        kinds = list(_parsed(log))
        axes = {m.metric.name or m.metric.glob_name: m.metric.step_metric for k, m in kinds if k == "metric"}
        assert axes == {"step": "", "*": "step"}, axes
        assert {u.key for k, r in kinds if k == "run" for u in r.run.config.update} >= {"model"}
        assert all(set(row) >= {"step", "epoch", "loss", "lr"} and "best" not in row for row in _history(log))


@pytest.mark.parametrize("enabled, mode", [(False, "offline"), (True, "disabled")])
def test_no_wandb_on_other_ranks_or_when_disabled(tmp_path, monkeypatch, enabled, mode):
    """Ranks other than 0 (enabled=False) never touch W&B, whatever the mode, nor write metrics.jsonl;
    wandb_mode=disabled writes metrics.jsonl only: no wandb directory, no run id file."""
    import wandb

    from trainer.metrics import WANDB_ID_FILE, MetricsWriter

    monkeypatch.delenv("WANDB_MODE", raising=False)

    def no_init(*args, **kwargs):
        raise AssertionError("wandb.init called")

    monkeypatch.setattr(wandb, "init", no_init)
    w = MetricsWriter(tmp_path, enabled=enabled, wandb_mode=mode, config={"a": 1}, resume_step=0)
    w.log(_train_record(1, 1.5))
    w.close(plot=False)
    assert not (tmp_path / "wandb").exists() and not (tmp_path / WANDB_ID_FILE).exists()
    assert (tmp_path / "metrics.jsonl").is_file() == enabled


def test_a_dead_wandb_service_does_not_stop_the_run(tmp_path, capsys):
    """W&B's service process killed mid-run (e.g. by the OOM killer): every later wandb call raised
    ConnectionResetError out of MetricsWriter.log and ended training, and every later run in the process
    failed in wandb.init; now W&B is switched off with one message, metrics.jsonl keeps every record, and
    the next run starts a new service."""
    import psutil

    from trainer.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(tmp_path, enabled=True, wandb_mode="offline", config={"a": 1})
    writer.log(_train_record(1, 1.0))
    service = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("wandb")]
    assert service, "no wandb service process to kill"
    for proc in service:
        proc.kill()
    psutil.wait_procs(service, timeout=10)
    for step in range(2, 5):
        writer.log(_train_record(step, float(step)))
    writer.close(plot=False)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    out = capsys.readouterr().out
    assert out.count("W&B off for the rest of this run") == 1, out
    # a later run in this process (a Hydra multirun member) gets a new service, not the dead one's connection
    later = MetricsWriter(tmp_path / "later", enabled=True, wandb_mode="offline")
    later.log(_train_record(1, 1.0))
    later.close(plot=False)
    assert [_history_steps(log) for log in _offline_logs(tmp_path / "later")] == [[1]]
