"""Non-finite guard: a NaN loss skips the step (weights untouched) and K in a row stop the run with
a message naming the step, the bad loss term and the last good checkpoint.

    .venv/bin/python -m pytest tests/test_guard.py -q
"""

from __future__ import annotations

import pytest
import torch

from data.collate import to_device
from data.stream import StoreStream
from tests.train_utils import tiny_store
from trainer.classifier import build_classifier
from trainer.config import load_config
from trainer.export import build_module
from trainer.guard import NonFiniteError, StepGuard
from trainer.guarded_step import train_one_step
from trainer.parallel import wrap


def _setup(tmp_path, n_batches=4, dense=False):
    """A small module, its wrapper and the first batches of a real 300-cell store."""
    store = tiny_store(tmp_path / "store", n_cells=300)
    cfg = load_config({"data": {"store": str(store)}, "model": {"n_hidden": 16, "n_latent": 4}})
    torch.manual_seed(0)
    stream = StoreStream(store, 32, chunk_size=16, prefetch=0)
    module = build_module(stream.meta, cfg)
    w = wrap(module, build_classifier(module), cfg.optim, cfg.dist, torch.device("cpu"), 32)
    return module, w, [to_device(b, "cpu", dense=dense) for b, _ in zip(stream, range(n_batches), strict=False)]


def test_nan_steps_are_skipped_then_stop_with_a_useful_message(tmp_path):
    module, w, batches = _setup(tmp_path, n_batches=5, dense=True)
    guard = StepGuard(max_bad_steps=3, last_good_checkpoint="/runs/x/checkpoints/step_000000001")

    assert train_one_step(w, batches[0], 1.0, None, guard, 0) is not None  # a good step
    before = {k: v.clone() for k, v in module.state_dict().items()}
    clf_before = {k: v.clone() for k, v in w.classifier.state_dict().items()}
    bad = dict(batches[1])
    bad["rna"] = bad["rna"].clone()
    bad["rna"][0, 0] = float("nan")  # one corrupt count: NaN loss terms (and NaN batch-norm statistics)
    assert train_one_step(w, bad, 1.0, None, guard, 1) is None
    assert train_one_step(w, bad, 1.0, None, guard, 2) is None
    assert guard.skipped_total == 2 and guard.consecutive == 2
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    for k, v in w.classifier.state_dict().items():
        assert torch.equal(v, clf_before[k]), f"classifier {k} changed on a skipped step"

    assert train_one_step(w, batches[2], 1.0, None, guard, 3) is not None  # a good step resets the streak
    assert guard.consecutive == 0 and guard.skipped_total == 2
    for step in (4, 5):
        assert train_one_step(w, bad, 1.0, None, guard, step) is None
    with pytest.raises(NonFiniteError) as err:
        train_one_step(w, bad, 1.0, None, guard, 6)
    msg = str(err.value)
    assert "step 6" in msg and "recon_rna" in msg and "step_000000001" in msg


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("native", [True, False])
def test_nan_probabilities_in_the_atac_likelihood_are_a_skipped_step(tmp_path, dense, native):
    """NaN reaching the ATAC likelihood (every kernel: native, eager, dense or CSR input) is a NaN
    recon_atac that the guard skips and names; torch's F.binary_cross_entropy, which the likelihood no longer
    calls, raised on the CPU and was a device-side assert (a dead CUDA context) on the GPU instead."""
    module, w, batches = _setup(tmp_path, n_batches=2, dense=dense)
    module.native_kernels = native
    guard = StepGuard(max_bad_steps=2)
    with torch.no_grad():
        module.atac_out.weight[0, 0] = float("nan")  # region 0's probability is NaN for every cell
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert train_one_step(w, batches[0], 1.0, None, guard, 0) is None
    assert guard.skipped_total == 1 and guard.history[-1].startswith("step 0: non-finite")
    assert "recon_atac" in guard.history[-1] and "recon_rna" not in guard.history[-1]
    for k, v in module.state_dict().items():
        assert torch.equal(v.isnan(), before[k].isnan()) and torch.equal(v.nan_to_num(), before[k].nan_to_num()), \
            f"{k} changed on a skipped step"
    with pytest.raises(NonFiniteError, match="step 1.*recon_atac"):
        train_one_step(w, batches[1], 1.0, None, guard, 1)


def test_the_bad_term_is_named_and_a_nonfinite_gradient_is_caught():
    guard = StepGuard(max_bad_steps=2)
    assert guard.check(0, {"loss": 1.0, "recon_atac": 2.0}) is False
    assert guard.check(1, {"loss": float("nan"), "recon_atac": torch.tensor(float("inf"))}) is True
    assert guard.history[-1] == "step 1: non-finite loss, recon_atac"
    assert guard.check(2, {"loss": 1.0}) is False
    guard.step_taken()  # the optimizer stepped: the streak ends
    assert guard.check(3, {"grad_norm": float("inf")}) is True
    with pytest.raises(NonFiniteError, match="step 4.*grad_norm"):
        guard.check(4, {"grad_norm": float("nan")})


def test_a_nan_gradient_with_a_finite_loss_stops_the_run_after_k_steps(tmp_path):
    """The loss terms pass their check and the gradient norm fails its own: still one bad step in a row
    each time (a passing loss check used to reset the streak, so such a run never stopped)."""
    module, w, batches = _setup(tmp_path)
    guard = StepGuard(max_bad_steps=3)
    hook = next(module.parameters()).register_hook(lambda g: g * float("nan"))
    assert train_one_step(w, batches[0], 1.0, None, guard, 0) is None
    assert train_one_step(w, batches[1], 1.0, None, guard, 1) is None
    assert guard.consecutive == 2
    with pytest.raises(NonFiniteError, match="step 2: 3 consecutive.*grad_norm"):
        train_one_step(w, batches[2], 1.0, None, guard, 2)
    hook.remove()
    assert train_one_step(w, batches[3], 1.0, None, StepGuard(max_bad_steps=3), 3) is not None


def test_an_fp16_overflow_skip_backs_off_the_loss_scale(tmp_path):
    """fp16 (GPU) enables the GradScaler; an overflowing step is skipped by the guard after unscale_.
    The scaler must still update(): the scale halves, and the next step's unscale_ does not raise
    'unscale_() has already been called on this optimizer since the last update()'."""
    module, w, batches = _setup(tmp_path)
    w.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120, enabled=True)  # what fp16 builds, overflowing
    guard = StepGuard(max_bad_steps=50)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert train_one_step(w, batches[0], 1.0, None, guard, 0) is None
    assert w.scaler.get_scale() == 2.0**119
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    step, out = 1, None
    while out is None and step < 40:  # the scale backs off until the step fits, then training proceeds
        out = train_one_step(w, batches[step % len(batches)], 1.0, None, guard, step)
        step += 1
    assert out is not None and guard.consecutive == 0 and w.scaler.get_scale() < 2.0**119


def test_fp16_loss_scale_back_off_is_not_a_run_of_bad_steps(tmp_path):
    """What dist.precision=fp16 builds on a GPU, emulated with CPU fp16 autocast: the GradScaler starts at
    2**16 and MultiVI's gradients (norm ~7e3 here) overflow fp16 until it has halved ~12 times in a row.
    Those skips counted toward max_bad_steps (default 5): the run stopped at step 4 with NonFiniteError
    before a single update. A real NaN gradient still stops the run once the scale is down to 1."""
    module, w, batches = _setup(tmp_path, n_batches=4)
    w.amp_dtype = torch.float16
    w.scaler = torch.amp.GradScaler("cpu", enabled=True)  # DDPWrapped's fp16 scaler (init_scale 2**16)
    guard = StepGuard()  # the default run.max_bad_steps
    assert guard.max_bad_steps == 5
    outs = [train_one_step(w, batches[s % len(batches)], 1.0, None, guard, s) for s in range(20)]
    first = next(s for s, o in enumerate(outs) if o is not None)
    assert first >= guard.max_bad_steps, "no back-off happened: the test would not cover anything"
    assert sum(o is not None for o in outs[first:]) >= 5 and guard.consecutive == 0
    assert 1.0 < w.scaler.get_scale() < 2.0**16

    hook = next(module.parameters()).register_hook(lambda g: g * float("nan"))  # NaN at any scale
    with pytest.raises(NonFiniteError, match="grad_norm"):
        for s in range(20, 60):
            train_one_step(w, batches[s % len(batches)], 1.0, None, guard, s)
    hook.remove()
    assert w.scaler.get_scale() <= 1.0  # it stopped only after the scale could no longer explain it


def test_a_nan_classifier_gradient_skips_only_the_classifier_step(tmp_path):
    """A non-finite gradient of the adversarial classifier (the VAE's own step fine) went into Adam
    unchecked: every classifier weight became NaN, and every later VAE step had a NaN fool term and was
    skipped until the run stopped at step 5 blaming "adversarial, loss". Now only the classifier's step is
    skipped (counted, its batch-norm statistics restored); if it persists the run stops naming it."""
    module, w, batches = _setup(tmp_path, n_batches=4)
    guard = StepGuard(max_bad_steps=3)
    assert train_one_step(w, batches[0], 1.0, None, guard, 0) is not None
    clf_before = {k: v.detach().clone() for k, v in w.classifier.named_parameters()}
    # the hook fires in the classifier's own backward only (its weights are frozen in the VAE's forward)
    hook = next(w.classifier.parameters()).register_hook(lambda g: g * float("nan"))
    vae_before = {k: v.clone() for k, v in module.state_dict().items()}
    assert train_one_step(w, batches[1], 1.0, None, guard, 1) is not None  # the VAE step is taken
    hook.remove()
    assert any(not torch.equal(v, vae_before[k]) for k, v in module.state_dict().items())
    for k, v in w.classifier.named_parameters():  # (its batch-norm statistics moved in the VAE's forward)
        assert torch.equal(v, clf_before[k]), f"classifier {k} changed on a skipped classifier step"
    assert guard.classifier_skipped == 1 and guard.skipped_total == 0
    for step in (2, 3):  # training goes on: no NaN fool term poisons the VAE's steps
        out = train_one_step(w, batches[step], 1.0, None, guard, step)
        assert out is not None and all(torch.isfinite(torch.tensor(v)) for v in out.values()), out
    assert guard.classifier_consecutive == 0

    hook = next(w.classifier.parameters()).register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match="step 6: 3 consecutive non-finite steps of the adversarial classifier"):
        for step in range(4, 8):
            train_one_step(w, batches[step % 4], 1.0, None, guard, step)
    hook.remove()


def test_the_classifier_step_refuses_a_latent_with_inf(tmp_path):
    """The wrapper's classifier step called directly with a real classifier and a z holding one inf."""
    module, w, batches = _setup(tmp_path, n_batches=1)
    codes = batches[0]["batch"]
    z = torch.randn(codes.shape[0], module.n_latent)
    z[0, 0] = float("inf")
    guard = StepGuard()
    before = {k: v.clone() for k, v in w.classifier.state_dict().items()}
    loss = w.classifier_step(z, codes, guard, 7)
    assert not torch.isfinite(loss) and guard.classifier_skipped == 1
    for k, v in w.classifier.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "step 7: non-finite classifier loss nan" in guard.history[-1]
    assert torch.isfinite(w.classifier_step(torch.randn_like(z), codes, guard, 8))
    assert guard.classifier_consecutive == 0
    for k, v in w.classifier.state_dict().items():
        assert torch.isfinite(v.float()).all(), k
