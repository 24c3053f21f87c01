"""1-process training end to end, the exported model, and exact resume after SIGKILL.

    .venv/bin/python -m pytest tests/test_train.py -q
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.collate import to_device
from data.stream import StoreStream
from tests.train_utils import (
    PY,
    ROOT,
    as_cli,
    env,
    tiny_config,
    tiny_overrides,
    tiny_store,
    validations_get_worse,
)
from trainer.export import load_model
from trainer.metrics import read_metrics
from trainer.train import train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "store")


def test_one_process_run_writes_everything_and_the_model_loads(store, tmp_path):
    cfg = tiny_config(store, tmp_path / "run", **{"logger.plot": True})
    res = train(cfg)
    run = tmp_path / "run"
    assert res.epochs == 2 and res.steps > 0 and res.model_dir == str(run / "model")
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "result.json", "model/model.safetensors",
                 "model/model.json"):
        assert (run / name).is_file(), name
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    for key in ("loss", "recon_rna", "recon_atac", "kl", "penalty", "adversarial", "classifier", "kl_weight",
                "lr", "grad_norm", "cells_per_s", "data_wait_s", "non_step_s", "mem_rss_mb", "skipped_steps"):
        assert key in train_rows[-1], key
    assert train_rows[0]["kl_weight"] == 0.0 and train_rows[-1]["kl_weight"] == 0.5  # 2-epoch warm-up
    val = [r for r in rows if r["kind"] == "validation"]
    assert len(val) == 2 and val[-1]["reconstruction_loss_validation"] < val[0]["reconstruction_loss_validation"] * 1.5

    module, info = load_model(run / "model")
    assert info["gene_names"][:2] == ["gene_00000", "gene_00001"] and info["model_args"]["n_latent"] == 6
    trained = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(module.state_dict()[k].float(), v) for k, v in trained.items())
    batch = to_device(next(iter(StoreStream(store, 64, split="validation", shuffle=False))), "cpu")
    with torch.no_grad():
        assert torch.isfinite(module.loss(batch).loss)


def test_config_errors_stop_the_cli_naming_the_key(store, tmp_path):
    ov = tiny_overrides(store, tmp_path / "run")
    r = subprocess.run([PY, "-m", "trainer.train", *as_cli(ov), "+run.epoch=3"], cwd=ROOT, env=env(),
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "run.epoch" in (r.stdout + r.stderr)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_diverging_run_stops_with_its_one_line_message(store, tmp_path):
    """optim.lr=1e6 diverges at once; the guard's stop (step, bad terms, last good checkpoint) came under a
    Python traceback that added nothing."""
    ov = tiny_overrides(store, tmp_path / "run")
    r = subprocess.run([PY, "-m", "trainer.train", *as_cli(ov), "optim.lr=1e6", "run.max_bad_steps=3"], cwd=ROOT,
                       env=env(), check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("mva-train: error: stopping at step 3: 3 consecutive "
                                                        "non-finite steps"), r.stderr[-3000:]


def test_deepspeed_with_fp16_is_refused_at_start_up_in_one_line(store, tmp_path):
    """dist.backend=deepspeed with dist.precision=fp16 was accepted; on a GPU DeepSpeed's loss scale (2**16)
    can only back off inside engine.step(), which the guard's skips (ZeRO 0) or bad-step count (ZeRO 1/2)
    cut short, so such a run would stop after run.max_bad_steps. Refused, naming what to use instead."""
    ov = tiny_overrides(store, tmp_path / "run", **{"dist.backend": "deepspeed", "dist.precision": "fp16"})
    r = subprocess.run([PY, "-m", "trainer.train", *as_cli(ov)], cwd=ROOT, env=env(), check=False,
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in out, out[-2000:]
    line = next(x for x in out.splitlines() if "dist.precision=fp16" in x)
    assert "dist.backend=deepspeed" in line and "dist.precision=bf16" in line and "dist.backend=ddp" in line
    assert not (tmp_path / "run").exists()
    for ok in ({"dist.backend": "deepspeed", "dist.precision": "bf16"}, {"dist.precision": "fp16"}):
        tiny_config(store, tmp_path / "run", **ok)  # the two alternatives it names are accepted


def test_a_last_batch_of_one_cell_is_refused_at_start_up(tmp_path):
    """data.remainder=none with a batch size that leaves 1 training cell over: the adversarial classifier's
    batch norm raised "Expected more than 1 value per channel when training" (a ValueError traceback) at the
    end of the first epoch, after its whole compute."""
    from data.store import open_store
    from data.stream import StoreStream
    from trainer.config import ConfigError

    store = tiny_store(tmp_path / "store", n_cells=400)
    n = StoreStream(open_store(store), 64, split="train", remainder="none").plan().n_cells
    size = next(b for b in range(40, 120) if n % b == 1)
    cfg = tiny_config(store, tmp_path / "run", **{"data.remainder": "none", "data.batch_size": size, "run.epochs": 1})
    with pytest.raises(ConfigError, match=rf"last training batch of 1 cell \({n} training cells, "
                                          rf"data.batch_size={size}\).*adversarial classifier"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    train(tiny_config(store, tmp_path / "ok", **{"data.remainder": "none", "data.batch_size": size + 1,
                                                 "run.epochs": 1, "run.early_stopping": False}))


@pytest.mark.slow  # a store built from the real data and four mva-train processes
def test_a_store_without_regions_or_a_bad_model_option_is_one_line(tmp_path):
    """An RNA-only store (a legal mva-build output) and model.gene_likelihood=zinbb ended in a ValueError
    traceback after the store was opened."""
    from data.build import build_store
    from data.config import BuildConfig, InputConfig

    rna = "/work/shared/data/neurips2021_bmmc_multiome_starter/bmmc_starter_rna.h5ad"
    rna_only = build_store(BuildConfig(out=str(tmp_path / "rna.zarr"), progress=False,
                                       inputs=[InputConfig(kind="h5ad_pair", rna=rna)]))
    synth = tiny_store(tmp_path / "synth", n_cells=400)
    for store, extra, needle in ((rna_only, [], "has 600 genes and 0 regions"),
                                 (tmp_path / "none", ["model.gene_likelihood=zinbb"], "model.gene_likelihood"),
                                 # were ValueError tracebacks from the stream
                                 # (data.remainder=even, the default, trains any batch size: all cells in one)
                                 (synth, ["data.batch_size=100000", "data.remainder=drop"], "lower data.batch_size"),
                                 (synth, ["data.val_fraction=0.999999"], "lower data.val_fraction")):
        ov = tiny_overrides(store, tmp_path / "run")
        r = subprocess.run([PY, "-m", "trainer.train", *as_cli(ov), *extra], cwd=ROOT, env=env(),
                           check=False, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        # refused at start-up: no empty run directory left behind (it held only the run's lock)
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_gives_the_uninterrupted_weights(store, tmp_path):
    extra = {"run.epochs": 4, "run.checkpoint_every_steps": 5, "run.keep_checkpoints": 3}
    # uninterrupted reference (dropout on, adversarial classifier on: RNG + both optimizers must resume)
    ref = train(tiny_config(store, tmp_path / "ref", **extra))
    run = tmp_path / "run"
    args = [PY, "-m", "trainer.train", *as_cli(tiny_overrides(store, run, **extra))]
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ck = run / "checkpoints"
    while time.time() < deadline:  # kill as soon as a mid-epoch checkpoint (step 5, 10, ...) is complete
        done = sorted(ck.glob("step_*")) if ck.exists() else []
        if any(int(p.name.split("_")[1]) % 5 == 0 and int(p.name.split("_")[1]) < ref.steps for p in done):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "result.json").exists(), "the run finished before it was killed: test did not test"
    killed_at = max(int(p.name.split("_")[1]) for p in ck.glob("step_*"))
    assert killed_at < ref.steps
    r = subprocess.run(args, cwd=ROOT, env=env(), check=False, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=f"{k} differs after resume")
    assert json.loads((run / "result.json").read_text())["steps"] == ref.steps
    # metrics.jsonl reads like the uninterrupted run's: the steps logged after the checkpoint by the
    # killed process are dropped on resume instead of appearing twice
    def keys_of(path):
        return [(r["kind"], r["step"]) for r in read_metrics(path)]

    assert keys_of(run / "metrics.jsonl") == keys_of(tmp_path / "ref" / "metrics.jsonl")


def test_keep_best_exports_the_best_validation_weights(store, tmp_path, monkeypatch):
    # later validations read worse: "best" = the epoch-0 weights, which differ from the final ones; early
    # stopping off so training goes on after it
    validations_get_worse(monkeypatch)
    extra = {"run.epochs": 3, "run.keep": "best", "run.early_stopping": False}
    run = tmp_path / "run"
    res = train(tiny_config(store, run, **extra))
    vals = [r["reconstruction_loss_validation"] for r in read_metrics(run / "metrics.jsonl")
            if r["kind"] == "validation"]
    assert res.epochs == 3 and res.best == vals[0]
    exported = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(v, exported[k]) for k, v in load_file(str(run / "best" / "model.safetensors")).items())
    last = train(tiny_config(store, tmp_path / "last", **{**extra, "run.keep": "last"}))
    final = load_file(str(Path(last.model_dir) / "model.safetensors"))
    assert any(not torch.equal(final[k], exported[k]) for k in final), "best == last: test would be vacuous"


def test_validation_every_n_epochs_and_off(store, tmp_path):
    """run.validate_every_epochs: the validation pass runs after every n-th and the last epoch, or never."""
    res = train(tiny_config(store, tmp_path / "every2", **{"run.epochs": 5, "run.validate_every_epochs": 2}))
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "every2" / "metrics.jsonl") if r["kind"] == "validation"]
    assert res.epochs == 5 and epochs == [1, 3, 4] and res.last_validation
    off = {"run.epochs": 2, "run.validate_every_epochs": 0, "run.early_stopping": False}
    res = train(tiny_config(store, tmp_path / "off", **off))
    rows = read_metrics(tmp_path / "off" / "metrics.jsonl")
    assert res.epochs == 2 and res.steps > 0 and not [r for r in rows if r["kind"] == "validation"]
    assert res.last_validation == {} and res.best is None and Path(res.model_dir, "model.safetensors").is_file()


def test_size_factor_model_trains_and_its_library_is_the_observed_count(store, tmp_path):
    # use_size_factor needs the loader's per-cell log counts: the training stream must ask for them
    res = train(tiny_config(store, tmp_path / "run", **{"model.use_size_factor": True, "run.epochs": 1}))
    module, _ = load_model(res.model_dir)
    assert module.use_size_factor
    batch = to_device(next(iter(StoreStream(store, 64, split="validation", shuffle=False, size_factor=True))), "cpu")
    with torch.no_grad():
        inf = module.inference(batch)
        assert torch.isfinite(module.loss(batch).loss)
    has_rna = batch["mask"][:, 0]
    observed = torch.log(batch["rna"].to_dense().sum(1) if batch["rna"].is_sparse_csr else batch["rna"].sum(1))
    assert torch.allclose(inf["lib_rna"][has_rna, 0], observed[has_rna].to(inf["lib_rna"].dtype), atol=1e-5)
    # the inference jobs feed the same size factors
    from trainer.infer import infer
    from trainer.infer_config import InferConfig

    out = infer(InferConfig(model_dir=res.model_dir, store=str(store), output=str(tmp_path / "emb.zarr"),
                            job="expression", batch_size=256, progress=False))
    assert out["n_cells"] == 1200 and (tmp_path / "emb.zarr").is_dir()


def test_resume_none_refuses_an_earlier_runs_checkpoints(store, tmp_path):
    """Pruning keeps the highest step numbers: a resume=none run into a directory with an earlier run's
    checkpoints deleted its own as it wrote them, and a later resume=auto loaded the old run."""
    from trainer import checkpoint as ckpt
    from trainer.config import ConfigError

    run = tmp_path / "run"
    train(tiny_config(store, run, **{"run.epochs": 2}))
    before = ckpt.complete_checkpoints(run)
    with pytest.raises(ConfigError, match=r"run\.resume=none.*already holds checkpoints.*run\.resume=auto"):
        train(tiny_config(store, run, **{"run.epochs": 1, "run.resume": "none"}))
    assert ckpt.complete_checkpoints(run) == before


def test_step_warmup_with_zero_epoch_warmup_changes_within_the_epoch(store, tmp_path):
    """n_epochs_kl_warmup=0 means step-based warm-up in the schedule (as null does): the loop must
    recompute the weight every step, not once per epoch (that also made mid-epoch resumes inexact)."""
    n = 7
    extra = {"run.epochs": 2, "optim.n_epochs_kl_warmup": 0, "optim.n_steps_kl_warmup": n, "logger.log_every": 1}
    train(tiny_config(store, tmp_path / "run", **extra))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) > n
    for r in rows:  # logged after the step: the weight of step s - 1
        assert r["kl_weight"] == pytest.approx(min((r["step"] - 1) / n, 1.0)), r


def test_a_nan_validation_never_becomes_the_best(store, tmp_path, monkeypatch):
    """nothing compares below NaN: a NaN first validation became `best` for good, later real
    improvements were counted as none, and early stopping fired on a model that was improving."""
    from trainer import loop

    real, calls = loop.validate, []

    def first_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out["reconstruction_loss_validation"])
        if len(calls) == 1:
            out["reconstruction_loss_validation"] = float("nan")
        return out

    monkeypatch.setattr(loop, "validate", first_nan)
    res = train(tiny_config(store, tmp_path / "run", **{"run.epochs": 4, "run.patience": 2}))
    assert res.epochs == 4 and not res.stopped_early
    assert res.best == min(calls[1:])  # the real values after the NaN one decrease as it trains


def test_a_max_steps_stop_mid_epoch_continues_exactly_when_the_limit_is_raised(store, tmp_path):
    """The stop at run.max_steps inside an epoch saves the stream position and the reason: resumed with
    a larger (or no) limit the run trains on from there and ends with the uninterrupted run's weights
    (before, the checkpoint said stopped=True with no stream state: the resumed run trained nothing)."""
    # early stopping and keep=best on: the validation at the stop is reported, not tracked
    opts = {"run.epochs": 3, "run.early_stopping": True, "run.patience": 50, "run.keep": "best"}
    full = train(tiny_config(store, tmp_path / "full", **opts))
    per_epoch = full.steps // 3
    limit = per_epoch + 2  # inside epoch 1
    part = tmp_path / "part"
    first = train(tiny_config(store, part, **{**opts, "run.max_steps": limit}))
    assert first.steps == limit and first.epochs == 1 and not first.stopped_early
    again = train(tiny_config(store, part, **{**opts, "run.max_steps": limit}))
    assert again.steps == limit  # the same limit: nothing more to do
    done = train(tiny_config(store, part, **opts))
    assert done.steps == full.steps and done.epochs == 3 and not done.stopped_early and done.best == full.best
    a = load_file(str(Path(full.model_dir) / "model.safetensors"))
    b = load_file(str(Path(done.model_dir) / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the history keeps the stop's validation, marked as not tracked; loss.png draws the schedule's only
    from trainer.metrics import plotted_records

    vals = [r for r in read_metrics(part / "metrics.jsonl") if r["kind"] == "validation"]
    untracked = [r["step"] for r in vals if not r["tracked"]]
    assert untracked == [limit] and len(vals) == 4, [(r["step"], r["tracked"]) for r in vals]
    full_vals = [(r["step"], r["reconstruction_loss_validation"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl")
                 if r["kind"] == "validation"]
    drawn = [(r["step"], r["reconstruction_loss_validation"])
             for r in plotted_records(read_metrics(part / "metrics.jsonl")) if r["kind"] == "validation"]
    assert drawn == full_vals and all(r["tracked"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")
                                      if r["kind"] == "validation")
    stopped_here = plotted_records([*read_metrics(tmp_path / "full" / "metrics.jsonl")[:3], vals[0]])
    assert stopped_here[-1] is vals[0]  # a run that ended at the stop: its last validation is drawn


def test_keep_best_and_the_last_validation_travel_with_the_checkpoints(store, tmp_path, monkeypatch):
    """keep=best resumed from a checkpoint into another run directory still exports the best weights,
    and re-running a finished run re-exports its last validation (it wrote {} before)."""
    validations_get_worse(monkeypatch)
    extra = {"run.epochs": 3, "run.keep": "best", "run.early_stopping": False, "run.keep_checkpoints": 0}
    full = train(tiny_config(store, tmp_path / "full", **extra))
    first = min((tmp_path / "full" / "checkpoints").glob("step_*"))  # end of epoch 0: best = epoch 0
    resumed = train(tiny_config(store, tmp_path / "other", **{**extra, "run.resume": str(first)}))
    assert resumed.best == full.best
    a = load_file(str(Path(full.model_dir) / "model.safetensors"))
    b = load_file(str(Path(resumed.model_dir) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = json.loads((tmp_path / "full" / "result.json").read_text())["validation"]
    train(tiny_config(store, tmp_path / "full", **extra))  # nothing left to train: export again
    assert before and json.loads((tmp_path / "full" / "result.json").read_text())["validation"] == before


def test_an_empty_validation_split_is_refused_when_something_reads_it(store, tmp_path):
    """Early stopping / keep=best with no validation cells used to be switched off silently."""
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.val_fraction=0 leaves no validation cells"):
        tiny_config(store, tmp_path / "a", **{"data.val_fraction": 0.0})
    assert StoreStream(store, 64, split="validation", val_fraction=1e-4).eligible.sum() == 0  # none hashed in
    with pytest.raises(ConfigError, match=r"validation split .* is empty"):
        train(tiny_config(store, tmp_path / "b", **{"data.val_fraction": 1e-4}))
    res = train(tiny_config(store, tmp_path / "c", **{"data.val_fraction": 1e-4, "run.early_stopping": False,
                                                      "run.epochs": 1}))
    assert res.steps > 0 and res.best is None


def test_the_validation_at_a_max_steps_stop_does_not_count_for_early_stopping(store, tmp_path):
    """The uninterrupted run does not validate inside an epoch: with patience 1 and nothing counting as an
    improvement, the report at a mid-epoch max_steps stop used to count as a bad epoch and stop the run
    early for good, so raising the limit continued nothing."""
    opts = {"run.epochs": 4, "run.patience": 1, "run.min_delta": 1e9}
    full = train(tiny_config(store, tmp_path / "full", **opts))
    per_epoch = full.steps // 2
    assert full.stopped_early and full.epochs == 2  # epoch 0 sets best, epoch 1 is the one bad epoch
    part = tmp_path / "part"
    first = train(tiny_config(store, part, **{**opts, "run.max_steps": per_epoch + 2}))
    assert not first.stopped_early and first.last_validation
    done = train(tiny_config(store, part, **opts))
    assert done.stopped_early and done.steps == full.steps
    a = load_file(str(Path(full.model_dir) / "model.safetensors"))
    b = load_file(str(Path(done.model_dir) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_empty_validation_split_names_only_the_settings_that_read_it(store, tmp_path):
    """The refusal named run.keep='last' as reading the validation (only keep=best does) and told the user to
    set what was already set."""
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        tiny_config(store, tmp_path / "a", **{"data.val_fraction": 0.0, "run.early_stopping": True, "run.keep": "last"})
    assert "run.early_stopping=True reads the validation: set run.early_stopping=false," in str(exc.value)
    assert "run.keep" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"run\.keep='best' reads the validation: set run\.keep=last,"):
        tiny_config(store, tmp_path / "b", **{"data.val_fraction": 0.0, "run.early_stopping": False, "run.keep": "best"})
    with pytest.raises(ConfigError, match=r"run\.early_stopping=True and run\.keep='best' read the validation: set "
                                          r"run\.early_stopping=false and run\.keep=last"):
        tiny_config(store, tmp_path / "c", **{"data.val_fraction": 0.0, "run.early_stopping": True, "run.keep": "best"})
