"""Train records under DDP describe the global batch, not rank 0's minibatch.

    .venv/bin/python -m pytest tests/test_loop_ddp_records.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from data import keys
from data.collate import to_device
from data.store import open_store
from tests.train_utils import tiny_config, tiny_overrides, tiny_store, train_cli
from trainer import dist
from trainer.classifier import build_classifier
from trainer.export import build_module
from trainer.loop import seed_everything, step_noise
from trainer.schedules import kl_weight
from trainer.step import classifier_objective, vae_objective
from trainer.streams import make_stream

TERMS = ("recon_rna", "recon_atac", "kl", "penalty", "adversarial", "loss", "classifier")


def _first_step_terms(store, cfg, rank: int, world_size: int) -> tuple[dict[str, float], int]:
    """Rank ``rank``'s loss terms of step 1, computed in this process from the run's own pieces: the
    initial weights (seeded as the loop seeds them), that rank's first batch and noise, its dropout stream.
    Step 1's terms all come from the initial weights (the classifier's loss is taken before its step)."""
    seed_everything(cfg.run.seed)
    meta = open_store(cfg.data.store).meta
    module = build_module(meta, cfg)
    classifier = build_classifier(module, cfg.optim.adversarial)
    seed_everything(cfg.run.seed + 1 + rank)  # the loop's per-rank dropout stream
    info = dist.DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    stream = make_stream(open_store(cfg.data.store), cfg, "train", info)
    stream.set_epoch(0)
    batch = to_device(next(iter(stream)), info.device)
    n = batch[keys.BATCH].shape[0]
    eps = step_noise(cfg.run.seed, 0, rank * n, n, world_size * n, module.n_latent, info.device)  # step 1: equal batches
    kl_w = kl_weight(0, 0, cfg.optim.n_epochs_kl_warmup, cfg.optim.n_steps_kl_warmup)
    total, out, adversarial = vae_objective(module, classifier, batch, kl_w, cfg.optim.kappa, eps)
    cls = classifier_objective(classifier, out.z, batch[keys.BATCH], cfg.optim.kappa)
    terms = {"recon_rna": out.recon_rna.mean(), "recon_atac": out.recon_atac.mean(), "kl": out.kl.mean(),
             "penalty": out.penalty.mean(), "adversarial": adversarial, "loss": total, "classifier": cls}
    return {k: float(v.detach().double()) for k, v in terms.items()}, n


@pytest.mark.slow
def test_ddp_train_records_are_cell_weighted_means_over_ranks(tmp_path):
    """metrics.jsonl (and W&B) reported rank 0's own minibatch terms: on a 2-process run the recorded
    loss was rank 0's, not the global batch's."""
    store = tiny_store(tmp_path / "store", n_cells=600)
    run = tmp_path / "run"
    opts = {"logger.log_every": 1, "run.max_steps": 1, "run.epochs": 1}
    train_cli(tiny_overrides(store, run, **opts), nproc=2)
    record = next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x)
    assert record["step"] == 1

    with torch.no_grad():
        cfg = tiny_config(store, run, **opts)
        (t0, n0), (t1, n1) = (_first_step_terms(store, cfg, r, 2) for r in (0, 1))
    differ = [k for k in TERMS if abs(t0[k] - t1[k]) > 1e-3 * abs(t0[k]) + 1e-4]
    assert {"recon_rna", "recon_atac", "loss", "classifier"} <= set(differ), (t0, t1)  # a test that can fail
    for k in TERMS:
        expected = (n0 * t0[k] + n1 * t1[k]) / (n0 + n1)
        assert record[k] == pytest.approx(expected, rel=1e-5, abs=1e-6), (k, record[k], expected, t0[k], t1[k])


@pytest.mark.slow
def test_ddp_read_retries_are_counted_over_all_ranks(tmp_path):
    """result.json and the train records reported rank 0's store read retries as the run's: on a 2-process
    run with injected read errors rank 1 retried 97 reads that appeared nowhere but in its console line."""
    import re
    import subprocess

    from data import retry
    from tests.train_utils import PY, ROOT, as_cli, env

    store = tiny_store(tmp_path / "store", n_cells=600)
    run = tmp_path / "run"
    # no validation: every read of the run is a training read, made before the last step's record
    ov = tiny_overrides(store, run, **{"logger.log_every": 1, "run.epochs": 1, "run.validate_every_epochs": 0,
                                       "run.early_stopping": False})
    res = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "trainer.train", *as_cli(ov)], cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**env(), retry.INJECT_ENV: "0.2:7", retry.BACKOFF_ENV: "0.001"}, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    per_rank = {int(r): int(n) for r, n in re.findall(r"rank (\d): (\d+) store reads retried", res.stdout)}
    assert sorted(per_rank) == [0, 1] and min(per_rank.values()) > 0, res.stdout
    result = json.loads((run / "result.json").read_text())
    assert result["read_retries"] == sum(per_rank.values()), (result, per_rank)
    assert result["read_errors_injected"] == sum(per_rank.values())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "train"][-1]  # the epoch's last step (a train_epoch record follows)
    assert last["step"] == result["steps"]
    assert last["read_retries"] == sum(per_rank.values()), (last, per_rank)
