"""Benchmark: cells per CPU-second of one MultiVI training step, ours vs the reference (scvi-tools 1.5.1).

Both in one run, one torch thread, same sizes and weights: 2,000 genes, 10,000 regions, batch 128,
50 % paired / 25 % RNA-only / 25 % ATAC-only cells, ~35 % RNA and ~3.5 % ATAC density, 2 batches
(adversarial classifier on). The reference step is the body of its AdversarialTrainingPlan
(VAE AdamW step, then classifier Adam step) on dense tensors, as its data loader yields them; ours is
``trainer.step.train_step`` on sparse CSR input (the loader's format), the same with
``compile_kernels=True`` (ATAC likelihood kernels compiled by torch.compile; its one-off compile time is
reported separately, outside the per-step figure; without the native kernels), with the eager
likelihoods (``native_kernels=False``: what a machine without a C compiler runs), and on dense input.
On a CPU with native bf16 GEMMs (AVX512-BF16 / AMX) one more row runs ours under bf16 autocast (what
``dist.precision=bf16`` does there): a reduced-precision row, not part of the fp32 comparison.
The default module uses the fused C likelihood kernels (``trainer/native``) where they load. CPU time is
``time.process_time()``; all are timed in alternating chunks of 5 steps. ``--ab-skip`` adds our step
with the skipping of unmeasured rows switched off (``MultiVAE.skip_unmeasured``), sparse and dense.

Usage: ``OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/model_step.py --out outputs/bench/model_step.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
from step_batches import sparse, synthetic_batch

from trainer import native
from trainer.classifier import build_classifier
from trainer.module import MultiVAE
from trainer.precision import cpu_has_native_bf16
from trainer.reference import build_reference, reference_tensors, reference_training_plan
from trainer.step import build_optimizers, train_step


def time_interleaved(steppers: dict, warmup: int, steps: int, chunk: int = 5) -> dict[str, float]:
    """Cells per CPU-second of each stepper; chunks of ``chunk`` steps alternate between them so that
    load from other processes on a shared machine hits every implementation alike."""
    cpu = dict.fromkeys(steppers, 0.0)
    done = dict.fromkeys(steppers, 0)
    for step, batches in steppers.values():
        for i in range(warmup):
            step(batches[i % len(batches)])
    while min(done.values()) < steps:
        for name, (step, batches) in steppers.items():
            n = min(chunk, steps - done[name])
            start = time.process_time()
            for i in range(done[name], done[name] + n):
                step(batches[i % len(batches)])
            cpu[name] += time.process_time() - start
            done[name] += n
    return {name: done[name] * steppers[name][1][0]["batch"].shape[0] / cpu[name] for name in steppers}


def reference_stepper(ours: MultiVAE):
    ref = build_reference(ours).train()
    plan, opt1, opt2 = reference_training_plan(ref, adversarial=True)

    def step(tensors: dict) -> None:
        # body of AdversarialTrainingPlan.training_step (manual optimisation), kappa = 1
        _, _, loss_out = ref.forward(tensors, loss_kwargs={"kl_weight": 0.5})
        inf = ref._last_inf
        loss = loss_out.loss + plan.loss_adversarial_classifier(inf["z"], tensors["batch"], False)
        opt1.zero_grad()
        loss.backward()
        opt1.step()
        cls = plan.loss_adversarial_classifier(inf["z"].detach(), tensors["batch"], True)
        opt2.zero_grad()
        cls.backward()
        opt2.step()

    # keep the inference outputs of the last forward (the plan reads z from them)
    original = ref.inference

    def inference(*args, **kwargs):
        ref._last_inf = original(*args, **kwargs)
        return ref._last_inf

    ref.inference = inference
    return ref, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--regions", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the compile_kernels=True row")
    ap.add_argument(
        "--ab-skip",
        action="store_true",
        help="add rows with the module's skipping of unmeasured rows switched off (skip_unmeasured=False): "
        "the same math on every row, as the reference computes it",
    )
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/model_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(0)
    dense = [synthetic_batch(g, args.batch_size, args.genes, args.regions, 2) for _ in range(4)]
    torch.manual_seed(0)
    ours = MultiVAE(args.genes, args.regions, n_batch=2).train()
    eager = copy.deepcopy(ours)  # same weights, own optimizer state: the eager likelihoods
    eager.native_kernels = False
    compiled = copy.deepcopy(eager)  # the inductor-compiled ATAC kernels (without the native ones)
    compiled.compile_kernels = True
    _ref, ref_step = reference_stepper(ours)

    def stepper(module, amp: bool = False):
        cls = build_classifier(module)
        opts = build_optimizers(module, cls)
        # amp: what dist.precision=bf16 does on a CPU with native bf16 GEMMs (trainer/parallel.py)
        dtype = torch.bfloat16 if amp else None
        return lambda batch: train_step(module, cls, *opts, batch, kl_weight=0.5, amp_dtype=dtype)

    our_step = stepper(ours)
    ref_batches = [reference_tensors(b) for b in dense]
    native_state = "native kernels" if native.library() is not None else f"NO native kernels: {native.why_unavailable()}"
    print(f"default module: {native_state}")
    steppers = {
        "reference (dense input)": (ref_step, ref_batches),
        "ours (sparse CSR input)": (our_step, [sparse(b) for b in dense]),
        "ours (sparse, eager likelihoods)": (stepper(eager), [sparse(b) for b in dense]),
        "ours (sparse, compile_kernels)": (stepper(compiled), [sparse(b) for b in dense]),
        "ours (dense input)": (our_step, dense),
    }
    if cpu_has_native_bf16():  # a separate row: reduced-precision GEMMs, not the fp32 comparison
        steppers["ours (sparse, bf16 autocast)"] = (stepper(copy.deepcopy(ours), amp=True),
                                                   [sparse(b) for b in dense])
    if args.ab_skip:
        full = copy.deepcopy(ours)  # same weights, own optimizer state; decodes/encodes every row
        full.skip_unmeasured = full.skip_unmeasured_encoders = False
        full_step = stepper(full)
        steppers["ours (sparse, no skipping)"] = (full_step, [sparse(b) for b in dense])
        steppers["ours (dense, no skipping)"] = (full_step, dense)
    compile_cpu_s = None
    if args.no_compile:
        del steppers["ours (sparse, compile_kernels)"]
    else:  # the first step compiles (or loads inductor's on-disk cache): timed once, apart
        start = time.process_time()
        steppers["ours (sparse, compile_kernels)"][0](steppers["ours (sparse, compile_kernels)"][1][0])
        compile_cpu_s = round(time.process_time() - start, 2)
        print(f"compile_kernels: first step (compilation) took {compile_cpu_s} CPU-s in this process")
    results = time_interleaved(steppers, args.warmup, args.steps)
    base = results["reference (dense input)"]
    rows = [
        {"implementation": k, "cells_per_cpu_s": round(v, 1), "ratio_vs_reference": round(v / base, 2)}
        for k, v in results.items()
    ]
    print(f"{'implementation':<32} {'cells/CPU-s':>12} {'x reference':>12}")
    for r in rows:
        print(f"{r['implementation']:<32} {r['cells_per_cpu_s']:>12.1f} {r['ratio_vs_reference']:>12.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "genes": args.genes,
        "regions": args.regions,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "n_hidden": ours.n_hidden,
        "n_latent": ours.n_latent,
        "compile_first_step_cpu_s": compile_cpu_s,
        "native_kernels": native_state,
        "loadavg": os.getloadavg(),
    }
    args.out.write_text(json.dumps({"config": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
