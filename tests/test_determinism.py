"""Bit-reproducibility of training: the same run twice, and a resume from ANY checkpoint, end on the
same bits (atol=0) as the uninterrupted run; not only the exported weights but both optimizers, the
classifier and the RNG states of the last checkpoint.

    .venv/bin/python -m pytest tests/test_determinism.py -q            # incl. the slow fresh-process / torchrun ones

The reference run keeps a checkpoint after EVERY step, so the resume points do not depend on when a
kill lands: mid-epoch, right at an epoch boundary (after validation), and one batch before the end.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import tiny_config, tiny_overrides, tiny_store, train_cli
from trainer import checkpoint as ckpt
from trainer import checkpoint_checks as checks
from trainer.train import train

# 400 cells: 5 training batches of 64 per epoch; 3 epochs; a checkpoint per step, none pruned
EXTRA = {"run.epochs": 3, "run.checkpoint_every_steps": 1, "run.keep_checkpoints": 0, "run.early_stopping": False}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("det") / "store", n_cells=400)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """The uninterrupted run (in this process, one torch thread: tests/conftest.py)."""
    run = tmp_path_factory.mktemp("det") / "ref"
    res = train(tiny_config(store, run, **EXTRA))
    assert res.epochs == 3 and res.steps == 18
    return run


def _flat(obj, prefix: str = "") -> dict:
    """Nested checkpoint state -> {path: leaf}, so two states compare key by key."""
    if isinstance(obj, dict):
        return {k: v for key, sub in obj.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, sub in enumerate(obj) for k, v in _flat(sub, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): obj}


def _final_state(run: Path) -> dict:
    """Everything that carries on into further training: the last checkpoint's weights, AdamW and Adam
    moments and step counts, classifier, the RNG states, and the exported model."""
    last = ckpt.complete_checkpoints(run)[-1]
    state = {"model.pt": torch.load(last / "model.pt", weights_only=True),
             "rng": torch.load(last / "rank_0.pt", weights_only=True)["rng"],
             "export": load_file(str(run / "model" / "model.safetensors"))}
    return {"step": last.name, **_flat(state)}


def assert_bitwise_equal(got: Path, ref: Path) -> None:
    a, b = _final_state(ref), _final_state(got)
    assert a.keys() == b.keys()
    differ = []
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, torch.Tensor):
            if not (va.dtype == vb.dtype and va.shape == vb.shape and torch.equal(va, vb)):
                gap = float((va.double() - vb.double()).abs().max()) if va.shape == vb.shape else "shape"
                differ.append(f"{k} (max |diff| {gap})")
        elif va != vb:
            differ.append(f"{k} ({va!r} != {vb!r})")
    assert not differ, f"{got} differs from {ref} in {len(differ)} entries: {differ[:6]}"
    va, vb = (json.loads((r / "result.json").read_text())["validation"] for r in (ref, got))
    assert va == vb


def _resume_points(run: Path) -> dict[str, Path]:
    """Named checkpoints of the reference: first mid-epoch, the first epoch boundary (written after
    validation), a mid-epoch one in a later epoch, and the last mid-epoch one (one batch left)."""
    points = [(p, torch.load(p / "trainer.pt", weights_only=True)) for p in ckpt.complete_checkpoints(run)]
    mid = [p for p, s in points if s["batches_done"] > 0]
    boundary = [p for p, s in points if s["batches_done"] == 0 and 0 < s["epoch"] < 3]
    later_mid = [p for p, s in points if s["batches_done"] > 0 and s["epoch"] == 1]
    assert mid and boundary and later_mid, [p.name for p, _ in points]
    return {"first_mid_epoch": mid[0], "epoch_boundary": boundary[0], "epoch1_mid": later_mid[len(later_mid) // 2],
            "one_batch_left": mid[-1]}


def test_two_identical_runs_are_bitwise_equal(store, reference, tmp_path):
    again = tmp_path / "again"
    train(tiny_config(store, again, **EXTRA))
    assert_bitwise_equal(again, reference)
    # not vacuous: training moved the weights away from the first checkpoint
    first = torch.load(ckpt.complete_checkpoints(reference)[0] / "model.pt", weights_only=True)["model"]
    final = load_file(str(reference / "model" / "model.safetensors"))
    assert max(float((final[k] - first[k].float()).abs().max()) for k in final if k in first) > 1e-3


@pytest.mark.parametrize("point", ["first_mid_epoch", "epoch_boundary", "epoch1_mid", "one_batch_left"])
def test_resume_from_any_checkpoint_is_bitwise_equal(store, reference, tmp_path, point):
    src = _resume_points(reference)[point]
    # the checkpoint alone in a fresh run dir, as resume=auto finds it after a crash
    run = tmp_path / "resumed"
    shutil.copytree(src, ckpt.checkpoints_root(run) / src.name)
    res = train(tiny_config(store, run, **EXTRA))
    assert res.steps == 18 and res.epochs == 3
    assert_bitwise_equal(run, reference)


def test_a_resume_that_cannot_be_exact_says_why(store, reference, tmp_path, capsys):
    """Two things a checkpoint cannot carry: the torch thread count (reduction order) and the code.
    Both are recorded, and a resume with another value prints one line each; a plain resume none."""
    src = _resume_points(reference)["one_batch_left"]
    plain = tmp_path / "plain"
    shutil.copytree(src, ckpt.checkpoints_root(plain) / src.name)
    train(tiny_config(store, plain, **EXTRA))
    out = capsys.readouterr().out
    assert "resumed from" in out and "torch threads" not in out
    # in a shared checkout someone may edit trainer/ or data/ meanwhile: then the note is due
    edited = torch.load(src / "trainer.pt", weights_only=True)["code_fingerprint"] != checks.code_fingerprint()
    assert ("other trainer/loader code" in out) == edited, out[-2000:]

    run = tmp_path / "resumed"
    dst = ckpt.checkpoints_root(run) / src.name
    shutil.copytree(src, dst)
    state = torch.load(dst / "trainer.pt", weights_only=True)
    assert state["torch_threads"] == 1 and state["code_fingerprint"] == checks.code_fingerprint()
    torch.save({**state, "code_fingerprint": "written-by-an-older-version"}, dst / "trainer.pt")
    torch.set_num_threads(2)
    try:
        train(tiny_config(store, run, **EXTRA))
    finally:
        torch.set_num_threads(1)
    out = capsys.readouterr().out
    assert "written with 1 torch threads, this run uses 2" in out, out[-2000:]
    assert "written by other trainer/loader code or another torch version" in out, out[-2000:]


def test_a_resume_with_other_kernels_says_it_is_not_bit_for_bit(store, reference, tmp_path, capsys):
    """model.native_kernels is resumable (the same math), but the eager likelihoods round otherwise: a resume
    that switched them ended 1.5e-8 off the uninterrupted run and said nothing (review, session 21)."""
    src = _resume_points(reference)["one_batch_left"]
    run = tmp_path / "eager"
    shutil.copytree(src, ckpt.checkpoints_root(run) / src.name)
    saved = json.loads(torch.load(src / "trainer.pt", weights_only=True)["config"])
    assert saved["model"]["native_kernels"] is True  # what the reference run used: the switch is real
    train(tiny_config(store, run, **EXTRA, **{"model.native_kernels": False}))
    out = capsys.readouterr().out
    assert "with model.native_kernels (True -> False): the same math in other kernels; the run continues, but " \
           "not bit for bit" in out, out[-2000:]


@pytest.mark.slow
def test_fresh_processes_rerun_and_resume_bitwise_equal(store, reference, tmp_path):
    """`python -m trainer.train` in new processes: an uninterrupted run equals the in-process one, and a
    resume from a mid-epoch checkpoint in a fresh process (nothing shared with the writer) too."""
    train_cli(tiny_overrides(store, tmp_path / "cli", **EXTRA), timeout=300)
    assert_bitwise_equal(tmp_path / "cli", reference)
    src = _resume_points(reference)["epoch1_mid"]
    run = tmp_path / "cli_resumed"
    shutil.copytree(src, ckpt.checkpoints_root(run) / src.name)
    out = train_cli(tiny_overrides(store, run, **EXTRA), timeout=300).stdout
    assert f"resumed from {ckpt.checkpoints_root(run) / src.name}" in out
    assert_bitwise_equal(run, reference)


@pytest.mark.slow
def test_two_process_resume_is_bitwise_equal(store, tmp_path):
    """torchrun, 2 ranks (gloo, DDP gradient all-reduce, per-rank streams and RNG): a resume from a
    mid-epoch checkpoint of epoch 1 ends on the uninterrupted 2-rank run's bits."""
    ref = tmp_path / "ref2"
    train_cli(tiny_overrides(store, ref, **EXTRA), nproc=2, timeout=400)
    points = [(p, torch.load(p / "trainer.pt", weights_only=True)) for p in ckpt.complete_checkpoints(ref)]
    src = next(p for p, s in points if s["epoch"] == 1 and s["batches_done"] == 1)
    run = tmp_path / "resumed2"
    shutil.copytree(src, ckpt.checkpoints_root(run) / src.name)
    train_cli(tiny_overrides(store, run, **EXTRA), nproc=2, timeout=400)
    assert_bitwise_equal(run, ref)


@pytest.mark.slow  # ~20 s: spawned loader workers, 4 epochs' worth of spawns
def test_resume_with_loader_workers_is_bitwise_equal(store, tmp_path):
    """data.num_workers > 0: iter(DataLoader) draws its workers' seed from the generator it is given;
    with the global RNG (which drives dropout) a mid-epoch resume drew once more than the uninterrupted
    run and ended ~1e-2 away. The loader now has its own generator."""
    extra = {**EXTRA, "run.epochs": 2, "data.num_workers": 1, "data.prefetch": 2}
    ref = tmp_path / "ref"
    train(tiny_config(store, ref, **extra))
    points = [(p, torch.load(p / "trainer.pt", weights_only=True)) for p in ckpt.complete_checkpoints(ref)]
    src = next(p for p, s in points if s["epoch"] == 1 and s["batches_done"] == 2)
    run = tmp_path / "resumed"
    shutil.copytree(src, ckpt.checkpoints_root(run) / src.name)
    train(tiny_config(store, run, **extra))
    assert_bitwise_equal(run, ref)


@pytest.mark.slow  # ~15 s: two spawned workers
def test_persistent_loader_workers_follow_every_epoch(store, reference, tmp_path):
    """data.num_workers=2: the workers are started once per run and kept (persistent_workers), and follow the
    stream's epoch through shared memory (StoreStream.share_position). Workers that kept the epoch they were
    started with would replay epoch 0's order in epochs 1 and 2; the 3-epoch run must equal the in-process
    one bit for bit, with nothing left behind."""
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    run = tmp_path / "workers"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = train(tiny_config(store, run, **EXTRA, **{"data.num_workers": 2, "data.prefetch": 2}))
    assert res.epochs == 3 and res.steps == 18
    # torch's "Sparse invariant checks are implicitly disabled" on every run with workers (their CSR batches)
    assert not [w for w in seen if "invariant" in str(w.message)], [str(w.message)[:100] for w in seen]
    assert_bitwise_equal(run, reference)
    # EpochLoader.close() stopped the workers before train() returned (multiprocessing's resource tracker,
    # started with the first spawn, stays by design)
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in before and p.is_running() and "resource_tracker" not in " ".join(p.cmdline())]
    assert not left, [p.cmdline() for p in left]
