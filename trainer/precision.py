"""Which dtype a run autocasts to, on which device: ``dist.precision`` read against the hardware (the backends
in trainer/parallel.py apply it; DeepSpeed casts its weights itself instead)."""

from __future__ import annotations

import torch

from trainer import dist


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 GEMMs natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: a torch without it means "no"
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``dist.precision`` on ``device`` (None: plain fp32).

    GPU: bf16 or fp16. CPU: bf16 only where the CPU has native bf16 GEMMs (there its GEMMs run ~3x
    faster than fp32 ones, measured on the 2-core AVX512-BF16 VM; elsewhere bf16 is emulated and
    slower than fp32), never fp16. The heads cast their outputs back to fp32 (``nn.head``), so
    the likelihoods, the KL and the loss stay fp32 either way.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "bf16" and device.type == "cpu" and cpu_has_native_bf16():
        dist.print0("[parallel] precision=bf16: autocast on the CPU (native bf16 GEMMs)")
        return torch.bfloat16
    dist.print0(f"[parallel] precision={precision} needs a GPU (or, for bf16, a CPU with native bf16); "
                f"training in fp32 on {device.type}")
    return None


def deepspeed_bf16(precision: str, device: torch.device) -> bool:
    """Whether DeepSpeed trains bf16 weights (it casts the module itself; no autocast): ``dist.precision=bf16``
    on a GPU, or on a CPU with native bf16 GEMMs (the rule of the bf16 autocast above); elsewhere fp32."""
    return precision == "bf16" and (device.type == "cuda" or device.type == "cpu" and cpu_has_native_bf16())
