"""Trace the per-step training semantics of both quality-harness sides (issue #6).

Runs ours (trainer/loop.py) and the reference (scvi-tools MULTIVI) exactly as the harness configures
them (trainer/quality/ours.py, reference.py) on one synthetic scenario, and records for EVERY optimizer
step: epoch, kl weight, VAE optimizer hyper-parameters (class, lr, weight decay, betas, eps), classifier
optimizer hyper-parameters, gradient clipping, adversarial scale, batch size and the paired / RNA-only /
ATAC-only counts of the batch. Hooks wrap the real code paths (``trainer.loop.train_one_step``,
``AdversarialTrainingPlan.training_step``) without changing what they compute. Writes the per-step
records to ``<out>/trace.json`` and prints a side-by-side summary of every field that differs.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/trace_semantics.py --epochs 20 --fraction 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch


def _opt(o) -> dict | None:
    """The hyper-parameters of an optimizer's first param group (all groups are checked equal)."""
    if o is None:
        return None
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in o.param_groups]
    if any(g != groups[0] for g in groups):
        raise RuntimeError(f"{type(o).__name__} has param groups with different hyper-parameters: {groups}")
    g = groups[0]
    return {"class": type(o).__name__, "lr": g["lr"], "weight_decay": g["weight_decay"], "betas": g["betas"],
            "eps": g["eps"], "amsgrad": g.get("amsgrad"), "maximize": g.get("maximize"),
            # fused / foreach pick a kernel, not the math (same update up to rounding)
            "kernel": "fused" if g.get("fused") else "foreach" if g.get("foreach") else "default",
            "n_params": sum(p.numel() for pg in o.param_groups for p in pg["params"])}


def _composition(has_rna: np.ndarray, has_atac: np.ndarray, codes: np.ndarray) -> dict:
    # batch_code_1: cells of the second experimental batch; a sorted (unshuffled) order would show up
    # as minibatches of one experimental batch
    return {"batch_size": len(has_rna), "batch_code_1": int((codes == 1).sum()), "paired": int((has_rna & has_atac).sum()),
            "rna_only": int((has_rna & ~has_atac).sum()), "atac_only": int((~has_rna & has_atac).sum()),
            "empty": int((~has_rna & ~has_atac).sum())}


def check_objective(module, batch: dict, kl_weight: float, eps: torch.Tensor) -> dict:
    """Our objective and its gradient vs the reference module's, on this very training batch with the
    current (mid-training) weights: float64 copies, eval mode (no dropout), the same noise ``eps``.

    This extends tests/test_step_parity.py (3 steps, synthetic weights, a hand-made batch) to every
    checked step of the harness run. Returns the max relative differences of the loss and gradients.
    """
    import copy

    import torch.distributions.normal as tdn

    from trainer.reference import (
        build_reference,
        ours_state_from_reference,
        reference_forward,
        reference_tensors,
    )

    ours = copy.deepcopy(getattr(module, "module", module)).double().eval()
    ref = build_reference(ours).eval()

    def dense64(t):
        t = t.to_dense() if t.layout == torch.sparse_csr else t
        return t.double() if t.is_floating_point() else t

    b = {k: dense64(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    e = eps.double()
    out = ours.loss(b, kl_weight=kl_weight, eps=e)
    ours.zero_grad()
    out.loss.backward()
    real_draw = tdn._standard_normal
    tdn._standard_normal = lambda shape, dtype, device: (e.clone().to(dtype) if tuple(shape) == tuple(e.shape)
                                                         else torch.zeros(shape, dtype=dtype, device=device))
    try:
        _, _, rl = reference_forward(ref, reference_tensors(b, len(ours.n_cats_per_cov)), kl_weight)
    finally:
        tdn._standard_normal = real_draw
    ref.zero_grad()
    rl.loss.backward()
    ref_grads = {**ref.state_dict(), **{n: (p.grad if p.grad is not None else torch.zeros_like(p))
                                        for n, p in ref.named_parameters()}}
    mapped = ours_state_from_reference(ref_grads, ours.state_dict())
    worst, worst_name = 0.0, ""
    for n, p in ours.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        scale = float(mapped[n].abs().max()) or 1.0
        d = float((g - mapped[n]).abs().max()) / scale
        if d > worst:
            worst, worst_name = d, n
    return {"loss_ours": float(out.loss), "loss_ref": float(rl.loss),
            "loss_rel_diff": abs(float(out.loss) - float(rl.loss)) / abs(float(rl.loss)),
            "grad_max_rel_diff": worst, "grad_worst_param": worst_name}


def trace_ours(data, sc, s, work: Path, run_facts: dict, check_every: int = 0) -> list[dict]:
    from data import keys
    from trainer import loop
    from trainer.quality.ours import build_view_store, ours_config
    from trainer.train import train

    rows: list[dict] = []
    real = loop.train_one_step

    def hooked(w, batch, kl_weight, eps, guard, step, share=None):
        m = batch[keys.MASK].numpy().astype(bool)
        lm = getattr(w, "loss_module", None)
        rows.append({"step": step, "kl_weight": float(kl_weight), "vae_opt": _opt(w.optimizer),
                     "clf_opt": _opt(getattr(w, "clf_optimizer", None)),
                     "grad_clip": getattr(w, "grad_clip", "n/a"),
                     "adversarial_scale": getattr(lm, "kappa", None) if lm is not None else None,
                     "classifier": w.classifier is not None,
                     "train_mode": bool(w.module.training),
                     **_composition(m[:, 0], m[:, 1], batch[keys.BATCH].numpy().ravel())})
        if check_every and step % check_every == 0:
            rows[-1]["objective_check"] = check_objective(w.module, batch, kl_weight, eps)
        return real(w, batch, kl_weight, eps, guard, step, share)

    store, _ = build_view_store(data, sc, work)
    cfg = ours_config(store, s, work / "run")
    run_facts.update({"max_epochs": cfg.run.epochs, "early_stopping": cfg.run.early_stopping, "keep": cfg.run.keep,
                      "max_steps": cfg.run.max_steps, "val_fraction": cfg.data.val_fraction,
                      "remainder": cfg.data.remainder, "lr_schedule": "none (trainer has no scheduler)"})
    loop.train_one_step = hooked
    try:
        res = train(cfg)
    finally:
        loop.train_one_step = real
    run_facts["exported"] = f"keep={cfg.run.keep}: weights after step {res.steps}"
    epochs = _epochs_of(rows, work / "run")
    for r, e in zip(rows, epochs, strict=True):
        r["epoch"] = e
    return rows


def _epochs_of(rows: list[dict], run_dir: Path) -> list[int]:
    """Epoch of each step from our metrics log (log_every=1: one record per step, logged after the step
    counter is incremented, so step s is logged as s + 1)."""
    recs = [json.loads(line) for f in sorted(run_dir.rglob("metrics*.jsonl")) for line in f.read_text().splitlines()]
    by_step = {r["step"]: r["epoch"] for r in recs if r.get("kind") == "train"}
    return [by_step.get(r["step"] + 1, -1) for r in rows]


def trace_reference(data, sc, s, train_cells, cats, run_facts: dict) -> list[dict]:
    from scvi import REGISTRY_KEYS
    from scvi.train import AdversarialTrainingPlan

    from trainer.quality.reference import train_reference

    rows: list[dict] = []
    real = AdversarialTrainingPlan.training_step

    def hooked(self, batch, batch_idx):
        opts = self.optimizers()
        opt1, opt2 = (opts, None) if not isinstance(opts, list) else opts
        x_rna, x_atac = batch[REGISTRY_KEYS.X_KEY], batch[REGISTRY_KEYS.ATAC_X_KEY]
        kl = float(self.kl_weight)
        scale = self.scale_adversarial_loss
        if not rows:
            t = self.trainer
            run_facts.update({"max_epochs": t.max_epochs, "callbacks": sorted(type(c).__name__ for c in t.callbacks),
                              "val_batches": [len(d) for d in (t.val_dataloaders or [])] if
                              isinstance(t.val_dataloaders, list) else (len(t.val_dataloaders) if t.val_dataloaders
                                                                        else 0),
                              "reduce_lr_on_plateau": self.reduce_lr_on_plateau, "loss_kwargs": sorted(self.loss_kwargs),
                              "n_train_cells": len(t.train_dataloader.dataset) if t.train_dataloader is not None
                              and hasattr(t.train_dataloader, "dataset") else None,
                              "exported": "final weights (model.module after fit)"})
        rows.append({"step": len(rows), "epoch": int(self.current_epoch), "global_step": int(self.global_step),
                     "kl_weight": kl, "vae_opt": _opt(getattr(opt1, "optimizer", opt1)),
                     "clf_opt": _opt(getattr(opt2, "optimizer", opt2)) if opt2 is not None else None,
                     "grad_clip": {"val": self.trainer.gradient_clip_val,
                                   "algorithm": self.trainer.gradient_clip_algorithm,
                                   "automatic_optimization": self.automatic_optimization},
                     "adversarial_scale": (1 - kl) if scale == "auto" else float(scale),
                     "classifier": self.adversarial_classifier is not False,
                     "train_mode": bool(self.module.training),
                     "lr_schedulers": 0 if self.lr_schedulers() is None else 1,
                     **_composition((x_rna.sum(1) > 0).numpy(), (x_atac.sum(1) > 0).numpy(),
                                    batch[REGISTRY_KEYS.BATCH_KEY].numpy().ravel())})
        return real(self, batch, batch_idx)

    AdversarialTrainingPlan.training_step = hooked
    try:
        train_reference(data, sc, s, train_cells, cats)
    finally:
        AdversarialTrainingPlan.training_step = real
    return rows


def summarize(ours: list[dict], ref: list[dict]) -> str:
    """Side-by-side: step counts, per-epoch kl weight, optimizer settings, and batch composition."""
    lines = [f"steps: ours {len(ours)}, reference {len(ref)}"]
    for name, rows in (("ours", ours), ("reference", ref)):
        per_epoch = Counter(r["epoch"] for r in rows)
        lines.append(f"{name} steps/epoch: {sorted(set(per_epoch.values()))}; "
                     f"batch sizes: {dict(Counter(r['batch_size'] for r in rows))}")
        kl = {}
        for r in rows:
            kl.setdefault(r["epoch"], set()).add(round(r["kl_weight"], 9))
        lines.append(f"{name} kl weight per epoch: " + ", ".join(f"{e}:{sorted(v)}" for e, v in sorted(kl.items())))
        for key in ("vae_opt", "clf_opt", "grad_clip", "adversarial_scale", "classifier", "train_mode"):
            vals = {json.dumps(r[key], sort_keys=True) for r in rows}
            lines.append(f"{name} {key}: {' | '.join(sorted(vals))}")
        for k in ("paired", "rna_only", "atac_only", "empty", "batch_code_1"):
            v = np.array([r[k] / r["batch_size"] for r in rows])
            tot = sum(r[k] for r in rows)
            lines.append(f"{name} {k}: total {tot} cell-steps, share per batch mean {v.mean():.4f} sd {v.std():.4f}")
    checks = [r["objective_check"] for r in ours if "objective_check" in r]
    if checks:
        lines.append(f"objective check on {len(checks)} of our training steps (float64, eval, same eps): "
                     f"max loss rel diff {max(c['loss_rel_diff'] for c in checks):.2e}, max grad rel diff "
                     f"{max(c['grad_max_rel_diff'] for c in checks):.2e} "
                     f"({max(checks, key=lambda c: c['grad_max_rel_diff'])['grad_worst_param']})")
    return "\n".join(lines)


def run_trace(out: Path, n_cells: int = 600, epochs: int = 20, fraction: float = 0.1, seed: int = 0,
              check_every: int = 5) -> dict:
    """Both sides on one synthetic scenario in the harness's configuration; the full trace as a dict."""
    torch.set_num_threads(1)
    from data.split import cell_hash, is_validation
    from trainer.quality.data import synthetic_pair
    from trainer.quality.harness import pin_threads
    from trainer.quality.scenario import make_scenario
    from trainer.quality.settings import TrainSettings

    out.mkdir(parents=True, exist_ok=True)
    data = synthetic_pair(out / "data", n_cells=n_cells)
    # the harness's settings for --epochs E: kl warm-up over E // 2 epochs (scripts/bench/quality.py)
    s = TrainSettings(epochs=epochs, seed=seed, n_epochs_kl_warmup=max(1, epochs // 2))
    sc = make_scenario(data.n_cells, fraction, seed)
    val = is_validation(cell_hash(data.cell_ids), s.val_fraction)
    cats = sorted(set(data.batch.tolist()))
    run_facts: dict = {"ours": {}, "reference": {}}
    pin_threads()
    ours = trace_ours(data, sc, s, out / "work", run_facts["ours"], check_every)
    pin_threads()
    ref = trace_reference(data, sc, s, np.flatnonzero(~val), cats, run_facts["reference"])
    shutil.rmtree(out / "work", ignore_errors=True)
    train = np.flatnonzero(~val)
    facts = {"n_train_cells": len(train), "train_paired": int(np.isin(sc.paired, train).sum()),
             "train_rna_only": int(np.isin(sc.rna_only, train).sum()),
             "train_atac_only": int(np.isin(sc.atac_only, train).sum()), "loadavg": os.getloadavg()}
    return {"settings": {"n_cells": n_cells, "epochs": epochs, "fraction": fraction, "seed": seed,
                         "check_every": check_every},
            "facts": facts, "run_facts": run_facts, "ours": ours, "reference": ref}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/trace_semantics")
    ap.add_argument("--synthetic-cells", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-every", type=int, default=5,
                    help="compare our objective and gradient with the reference module's every N steps (0: off)")
    a = ap.parse_args()
    out = Path(a.out)
    t = run_trace(out, a.synthetic_cells, a.epochs, a.fraction, a.seed, a.check_every)
    (out / "trace.json").write_text(json.dumps(t, default=str))
    print(json.dumps(t["facts"]))
    for side, f in t["run_facts"].items():
        print(f"{side} run: {json.dumps(f, default=str)}")
    print(summarize(t["ours"], t["reference"]))


if __name__ == "__main__":
    main()
