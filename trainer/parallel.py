"""The parallel wrapping, in ONE place: one function per backend returning a ``Wrapped`` object with a
uniform API (``forward`` / ``backward`` / ``grad_norm`` / ``step`` / ``zero_grad`` / ``save`` / ``load``),
so the training loop never branches on the backend.

* VAE: DDP (gloo on CPU, NCCL on GPU) or a DeepSpeed engine (ZeRO 0-2, client torch AdamW so nothing
  is JIT-compiled). Both only hook ``forward``, so the VAE is wrapped in ``LossModule`` whose
  forward is ``MultiVAE.loss``.
* Adversarial classifier: small, kept outside the engines in both backends, with its own torch
  optimizer; its gradients are averaged across ranks by one flat all-reduce before its step, so every
  rank holds the same classifier (the reference's manual-optimisation order is kept: VAE step with
  the classifier frozen, then classifier step on the detached latent).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from trainer import dist
from trainer.checkpoint import require_keys, safe_load, save_file  # save_file: fsync + a full disk's OSError
from trainer.config import DistConfig, OptimConfig
from trainer.export import weights_of
from trainer.precision import autocast_dtype, deepspeed_bf16
from trainer.step import classifier_objective, vae_objective


class LossModule(nn.Module):
    """forward = ``step.vae_objective``: what DDP / DeepSpeed wrap (they only hook ``forward``).

    The classifier is held but NOT registered as a submodule, so DDP does not all-reduce it and
    DeepSpeed does not put it in the VAE optimizer; it is frozen during this forward (the fool term
    only moves the VAE, as in the reference's manual optimisation).
    """

    def __init__(self, module: nn.Module, classifier: nn.Module | None, kappa: float):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_classifier", classifier)
        # listed once: walking the module tree per step cost ~0.1 ms (requires_grad_ twice)
        object.__setattr__(self, "_clf_params", [] if classifier is None else list(classifier.parameters()))
        self.kappa = kappa

    def forward(self, batch: dict, kl_weight: float, eps: torch.Tensor | None = None):
        # The classifier casts z to its own dtype itself (trainer/classifier.py): under DeepSpeed bf16
        # the VAE's weights are bf16 while the classifier, outside the engine, stays fp32.
        clf = self._classifier
        if clf is None:
            return vae_objective(self.module, None, batch, kl_weight, self.kappa, eps)
        _set_requires_grad(self._clf_params, False)
        try:
            return vae_objective(self.module, clf, batch, kl_weight, self.kappa, eps)
        finally:
            _set_requires_grad(self._clf_params, True)


def _set_requires_grad(params: list[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Mean of the gradients over ranks, as one flat all-reduce (the classifier's DDP)."""
    if not dist.is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat /= tdist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _total_norm(params) -> float:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(nn.utils.get_total_norm(grads, foreach=True))  # one foreach kernel, not one norm per tensor


def _fused(params) -> bool:
    """torch's single-kernel Adam/AdamW where it exists (same math; the per-parameter loop version
    costs ~12 ms of a ~45 ms CPU step at the benchmark sizes)."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class Wrapped:
    """Common part: the classifier and its optimizer, autocast, state of both optimizers."""

    def __init__(self, module: nn.Module, classifier: nn.Module | None, optim: OptimConfig,
                 dcfg: DistConfig, device: torch.device):
        self.module, self.classifier, self.optim_cfg, self.device = module, classifier, optim, device
        self.clf_optimizer = None
        # Parameter lists taken once: a tree walk per use cost ~0.7 ms per batch-128 CPU step (2 %); casts keep
        # the Parameter objects. Only what trains: a query (trainer/query.py) freezes part of the reference.
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.clf_params = [] if classifier is None else list(classifier.parameters())
        self._buffers: list[torch.Tensor] | None = None
        self._clf_buffers: list[torch.Tensor] = []
        if classifier is not None:
            self.clf_optimizer = torch.optim.Adam(self.clf_params, lr=optim.classifier_lr, eps=optim.classifier_eps,
                                                  weight_decay=optim.clf_weight_decay,
                                                  fused=_fused(self.clf_params))
        self.amp_dtype = self._autocast_dtype(dcfg, device)

    def _autocast_dtype(self, dcfg: DistConfig, device: torch.device) -> torch.dtype | None:
        return autocast_dtype(dcfg.precision, device)

    def buffers(self) -> list[torch.Tensor]:
        """Every buffer of the VAE and the classifier (batch-norm statistics), listed on first use:
        unlike parameters, buffers are new tensors after a dtype cast (DeepSpeed's, inside __init__)."""
        if self._buffers is None:
            self._clf_buffers = [] if self.classifier is None else list(self.classifier.buffers())
            self._buffers = list(self.module.buffers()) + self._clf_buffers
        return self._buffers

    def clf_buffers(self) -> list[torch.Tensor]:
        """The classifier's buffers (the tail of ``buffers()``), listed once as well."""
        self.buffers()
        return self._clf_buffers

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- classifier (identical in both backends) --------------------------------------------------
    def classifier_step(self, z: torch.Tensor, batch_codes: torch.Tensor, guard=None, step: int = 0,
                        share: float | None = None) -> torch.Tensor:
        """One step of the adversary on the detached latent; returns its loss (detached). ``share``: as the
        VAE's (trainer/global_batch.py). ``guard`` (a StepGuard; the loop passes it): a non-finite averaged
        gradient skips the step with no trace (batch-norm statistics restored; one such step made every
        classifier weight NaN)."""
        buffers = self.clf_buffers() if guard is not None else []
        saved = [b.detach().clone() for b in buffers]
        # no autocast: the classifier computes in its own dtype (trainer/classifier.py)
        loss = classifier_objective(self.classifier, z, batch_codes, self.optim_cfg.kappa)
        self.clf_optimizer.zero_grad(set_to_none=True)
        (loss if share is None else loss * share).backward()
        average_gradients(self.clf_params)
        if guard is not None and guard.check_classifier(step, _total_norm(self.clf_params), loss.detach()):
            self.clf_optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, v in zip(buffers, saved, strict=True):
                    b.copy_(v)
            return loss.detach()
        self.clf_optimizer.step()
        return loss.detach()

    def grad_norm_after_step(self) -> float | None:
        return None

    def scale_backing_off(self) -> bool:
        """True where a non-finite gradient is expected: fp16's GradScaler still above scale 1 (see DDPWrapped)."""
        return False

    def on_skip(self) -> None:
        """The loop skips this step (a non-finite term): undo what the backend did for it so far."""

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)
        if self.classifier is not None:
            self.classifier.train(mode)

    def _clf_state(self) -> dict[str, Any]:
        if self.classifier is None:
            return {}
        return {"classifier": self.classifier.state_dict(), "classifier_optimizer": self.clf_optimizer.state_dict()}

    def _load_clf_state(self, state: dict[str, Any]) -> None:
        if self.classifier is not None:
            self.classifier.load_state_dict(state["classifier"])
            self.clf_optimizer.load_state_dict(state["classifier_optimizer"])

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """The VAE optimizer's rate (the adversary keeps its own, as in the reference). DeepSpeed's optimizer
        shares the client AdamW's param groups (ZeRO 1/2 and bf16 wrap it), so this reaches its update too."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """The model's weights to export or keep as best, as CPU fp32 tensors, on rank 0 (None elsewhere).
        Call it on every rank: a backend may gather them with a collective."""
        return weights_of(self.module) if dist.get_rank() == 0 else None


class DDPWrapped(Wrapped):
    def __init__(self, module, classifier, optim, dcfg, device):
        super().__init__(module, classifier, optim, dcfg, device)
        self.loss_module = LossModule(module, classifier, optim.kappa)
        if dist.is_distributed():
            self.engine = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=dcfg.find_unused_parameters)
        else:
            self.engine = self.loss_module
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, eps=optim.eps,
                                           weight_decay=optim.weight_decay, fused=_fused(self.params))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self._unscaled = False  # unscale_ ran this step (fp16): a skip must still update() the scaler
        self.grad_clip = optim.grad_clip

    def forward(self, batch, kl_weight, eps=None):
        """(total loss, LossOutput, fool term) through the wrapper, so gradients get synchronised."""
        with self.autocast():
            return self.engine(batch, kl_weight, eps)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def grad_norm_before_step(self) -> float | None:
        """Global norm of the (already all-reduced) VAE gradients; clips them if configured."""
        self.scaler.unscale_(self.optimizer)
        self._unscaled = self.scaler.is_enabled()
        params = [p for p in self.params if p.grad is not None]
        if self.grad_clip is not None:
            return float(nn.utils.clip_grad_norm_(params, self.grad_clip))
        return _total_norm(params)

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._unscaled = False

    def scale_backing_off(self) -> bool:
        """fp16: the GradScaler starts at 2**16 and halves on every overflow until the scaled gradients fit
        in fp16; MultiVI's per-cell sums over genes have gradient norms of ~1e4, so it needs ~12 halvings
        in a row (measured on the tiny test store), and counted toward run.max_bad_steps (5) those skips
        stopped such a run at step 4 before it trained at all. Above scale 1 an overflow is that back-off;
        at or below 1 the gradient itself does not fit (or is NaN) and counts, so a real NaN still stops
        the run."""
        return self.scaler.is_enabled() and self.scaler.get_scale() > 1.0

    def on_skip(self) -> None:
        # fp16: an overflow (inf gradient) is skipped by the guard after unscale_; without update() the
        # scale would never back off and the next unscale_ raises "already been called ... since the
        # last update()". update() sees the recorded inf and halves the scale, as GradScaler.step would.
        if self._unscaled:
            self.scaler.update()
            self._unscaled = False

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: Path) -> None:
        if dist.get_rank() == 0:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), **self._clf_state()}
            save_file(state, Path(directory) / "model.pt")

    def load(self, directory: Path) -> None:
        f = Path(directory) / "model.pt"
        # one-line errors for a damaged file or missing states (load_state_dict moves tensors to the device)
        state = require_keys(safe_load(f), ("model", "optimizer"), f)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._load_clf_state(state)


def _import_deepspeed(device: torch.device) -> Any:
    # DeepSpeed's CPU comm backend JIT-compiles a shm op (~150 s of g++) that only speeds up
    # inference all-reduce; training collectives go through torch.distributed (stack notes §3).
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    dist.check_deepspeed_accelerator(device)
    return importlib.import_module("deepspeed")


def _unlinked_masters(opt: Any) -> dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 master where DeepSpeed does not link the two: bf16 ZeRO 0's FP16_UnfusedOptimizer
    pairs whole copies (``fp32_groups``) with the parameters (``fp16_groups``) by position; safe_get_... gives None."""
    return {id(lp): hp for lg, hg in zip(getattr(opt, "fp16_groups", ()), getattr(opt, "fp32_groups", ()))
            for lp, hp in zip(lg, hg) if lp.shape == hp.shape}


class DeepSpeedWrapped(Wrapped):
    def _autocast_dtype(self, dcfg: DistConfig, device: torch.device) -> torch.dtype | None:
        # no autocast: DeepSpeed casts the weights itself when bf16 is on
        if dcfg.precision != "fp32" and not deepspeed_bf16(dcfg.precision, device):
            dist.print0(f"[parallel] DeepSpeed: precision={dcfg.precision} needs a GPU or a CPU with native bf16; "
                        f"training in fp32 on {device.type}")
        return None

    def __init__(self, module, classifier, optim, dcfg, device, micro_batch: int):
        super().__init__(module, classifier, optim, dcfg, device)
        deepspeed = _import_deepspeed(device)

        self.zero_stage = dcfg.zero_stage
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": dcfg.zero_stage},
            "bf16": {"enabled": deepspeed_bf16(dcfg.precision, device)},  # (fp16 is refused by DistConfig)
            # gradients averaged over the ranks in fp32 (DeepSpeed's default with bf16 is bf16: 8 bits of mantissa
            # for the sum of every rank's gradient, the 10,000 x 100 first layers' included)
            "communication_data_type": "fp32",
            "gradient_clipping": optim.grad_clip or 0.0,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        # a client torch optimizer: DeepSpeed's own Adam would JIT-compile FusedAdam (~185 s on CPU); torch's fused
        # one, as DDP's (it steps ZeRO 1/2's flat fp32 partitions or bf16 ZeRO 0's copies; +8-24 %, benchmarks.md)
        client_opt = torch.optim.AdamW(self.params, lr=optim.lr, eps=optim.eps,
                                       weight_decay=optim.weight_decay, fused=_fused(self.params))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=LossModule(module, classifier, optim.kappa), optimizer=client_opt, config=ds_config,
            dist_init_required=True)  # joins the group init_distributed made (one exists even for 1 process)

    def forward(self, batch, kl_weight, eps=None):
        return self.engine(batch, kl_weight, eps)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def grad_norm_before_step(self) -> float | None:
        """ZeRO 0: the global norm of the all-reduced gradients (engine.backward reduced them), which the
        guard checks before the step -- DeepSpeed's stage 0 would apply a NaN gradient. ZeRO 1/2
        partition the gradients, so their norm is only known inside DeepSpeed's step, which skips the
        update itself when it is not finite (zero/stage_1_and_2.py, ``step``: overflow -> zero_grad,
        return); the loop then checks ``grad_norm_after_step``."""
        if self.zero_stage == 0:
            return _total_norm(self.params)
        return None

    def grad_norm_after_step(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False)
        if dist.get_rank() == 0 and self.classifier is not None:
            save_file(self._clf_state(), Path(directory) / "classifier.pt")

    def full_weights(self, master: bool | None = None) -> dict[str, torch.Tensor] | None:
        """The fp32 master weights where DeepSpeed trains lower-precision ones: with bf16 the module's
        parameters are bf16 and the AdamW updates go to fp32 copies (ZeRO 1/2: partitioned over the ranks);
        the module's own bf16 values, exported as they were, lost the last ~16 bits of every weight the run
        trained. ``master``: gather them (default: only where a parameter is not fp32; True checks the
        gather where the two agree, fp32 on a CPU). A collective over the ranks (ZeRO's partitions)."""
        if master is None:
            master = any(p.dtype != torch.float32 for p in self.module.parameters())
        if not master:
            return super().full_weights()
        from deepspeed.utils import safe_get_full_fp32_param

        # every rank, in one order: each parameter's gather is an all-reduce over the partitions
        full = {name: safe_get_full_fp32_param(p) for name, p in self.module.named_parameters()}
        if dist.get_rank() != 0:
            return None
        unlinked = _unlinked_masters(self.engine.optimizer)
        weights = weights_of(self.module)  # buffers, and parameters DeepSpeed holds no fp32 copy of (ZeRO 0 fp32)
        for (name, p), value in zip(self.module.named_parameters(), full.values(), strict=True):
            value = unlinked.get(id(p)) if value is None else value
            if value is not None:
                weights[name] = value.detach().to("cpu", torch.float32).contiguous().clone()
        return weights

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed")
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}")
        if self.classifier is not None:
            self._load_clf_state(torch.load(Path(directory) / "classifier.pt", map_location=self.device,
                                            weights_only=True))


def wrap(module: nn.Module, classifier: nn.Module | None, optim: OptimConfig, dcfg: DistConfig,
         device: torch.device, micro_batch: int) -> Wrapped:
    """The one place that picks the backend."""
    module.to(device)
    if classifier is not None:
        classifier.to(device)
    if dcfg.backend == "ddp":
        return DDPWrapped(module, classifier, optim, dcfg, device)
    if dcfg.backend == "deepspeed":
        return DeepSpeedWrapped(module, classifier, optim, dcfg, device, micro_batch)
    raise ValueError(f"unknown dist.backend {dcfg.backend!r}")

