"""Fused C kernels for the CPU training step: built once per machine, loaded with ctypes.

``kernels.c`` holds the ATAC product-Bernoulli and the ZINB negative log-likelihoods (float32, CSR
counts) with their gradients, each one fused loop instead of ~25 eager passes over (cells x
features) arrays (per step at the benchmark sizes ~4 ms instead of ~11 ms on one core), and the
sparse first layer ``x @ W`` with its weight gradient (docs/benchmarks.md). ``trainer/native/ops.py`` wraps them as autograd Functions; the eager code in
``trainer/fused.py`` / ``trainer/distributions.py`` stays the reference and the fallback.

The library is compiled by the system C compiler (``$CC``, else ``gcc``, else ``cc``) with
``-march=native`` into a per-user cache (``$MVA_KERNEL_CACHE``, default
``~/.cache/multivi-atlas/kernels``), keyed by the source, the flags, the compiler's version and the
CPU's instruction-set flags, so a cache shared by different machines never hands one a binary it
cannot run. Building takes ~1 s once; loading is instant. Written under a temporary name and
renamed, so concurrent ranks never load a half-written file.

Where the kernels cannot be had (no compiler, no glibc vector math, another OS, a failed self-check)
``library()`` returns None after one warning and every caller uses the eager code: same results to
float32 rounding, slower. ``MVA_NATIVE_KERNELS=0`` switches them off for the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import uuid
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
ABI_VERSION = 2
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
LIBS = ["-lmvec", "-lm"]
ENV_SWITCH = "MVA_NATIVE_KERNELS"

_lock = threading.RLock()
_state: dict[str, object] = {}  # "lib": CDLL | None once decided, "why": the reason it is None


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc.split()[0]):
        return cc
    if cc:  # a typo in CC would otherwise go unnoticed behind the fallback
        warnings.warn(f"CC={cc!r} is not an executable on PATH; building the native kernels with gcc/cc instead",
                      stacklevel=2)
    return shutil.which("gcc") or shutil.which("cc")


def cache_dir() -> Path:
    root = os.environ.get("MVA_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "multivi-atlas" / "kernels"


def _build(cc: str) -> Path:
    """Path of the compiled library, building it if this (source, flags, compiler, CPU) is new."""
    version = subprocess.run([*cc.split(), "--version"], check=False, capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS + LIBS), version, platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:20]
    out_dir = cache_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".w{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:  # read-only home: build for this process only
        out_dir = Path(tempfile.mkdtemp(prefix="mva-kernels-"))
    target = out_dir / f"mva_kernels_{key}.so"
    if target.is_file():
        return target
    # unique per build, not only per pid: containers sharing a cache volume often have equal pids
    tmp = out_dir / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    res = subprocess.run([*cc.split(), *FLAGS, str(SOURCE), "-o", str(tmp), *LIBS],
                         check=False, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} failed: {(res.stderr or res.stdout).strip()[-600:]}")
    os.replace(tmp, target)  # atomic: a concurrent rank sees the old state or the whole file
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mva_abi_version.restype = ctypes.c_int
    lib.mva_atac_fwd.argtypes = [p] * 7 + [i64, i64, i32]
    lib.mva_atac_bwd.argtypes = [p] * 10 + [i64, i64, i32]
    lib.mva_zinb_fwd.argtypes = [p] * 7 + [i64, i64, i32]
    lib.mva_zinb_bwd.argtypes = [p] * 10 + [i64, i64, i32]
    lib.mva_csc_index.argtypes = [p] * 3 + [i64, i64] + [p] * 3
    lib.mva_sparse_mm.argtypes = [p] * 5 + [i64, i64, i32]
    lib.mva_sparse_mm_t.argtypes = [p] * 5 + [i64, i64, i32]
    lib.mva_csr_dense.argtypes = [p] * 4 + [i64, i64]
    for name in ("mva_atac_fwd", "mva_atac_bwd", "mva_zinb_fwd", "mva_zinb_bwd", "mva_csc_index", "mva_sparse_mm",
                 "mva_sparse_mm_t", "mva_csr_dense"):
        getattr(lib, name).restype = None


def _load() -> ctypes.CDLL:
    if platform.system() != "Linux":
        raise RuntimeError(f"only built on Linux (glibc's vector math), not {platform.system()}")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    lib = ctypes.CDLL(str(_build(cc)), mode=ctypes.RTLD_LOCAL)
    _declare(lib)
    if lib.mva_abi_version() != ABI_VERSION:
        raise RuntimeError(f"library ABI {lib.mva_abi_version()} != {ABI_VERSION}")
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (switched off, or unavailable: warned once, eager code is used).

    The first call builds / loads the library and checks it against the eager code on a small case
    (``trainer/native/selfcheck.py``) before anything trains with it.
    """
    if _state.get("ready"):
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if _state.get("ready"):
            return _state["lib"]  # type: ignore[return-value]
        if _state.get("checking"):  # the self-check below, in this thread, runs the kernels
            return _state["lib"]  # type: ignore[return-value]
        lib, why = None, None
        if not enabled_by_env():
            why = f"{ENV_SWITCH}=0"
        else:
            try:
                lib = _load()
                from trainer.native.selfcheck import self_check

                _state.update(lib=lib, checking=True)
                try:
                    # CPU kernels, checked on CPU tensors: under torch.set_default_device("cuda") the
                    # check's tensors went to the GPU and the kernels were switched off for the process
                    with torch.device("cpu"):
                        problem = self_check()
                finally:
                    _state["checking"] = False
                if problem:
                    raise RuntimeError(f"self-check against the eager kernels failed: {problem}")
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                lib, why = None, f"{type(exc).__name__}: {exc}"
                warnings.warn(f"native CPU kernels unavailable ({why}); using the eager likelihoods "
                              "(same results, slower)", RuntimeWarning, stacklevel=2)
        _state.update(lib=lib, why=why, ready=True)
    return lib


def why_unavailable() -> str | None:
    library()
    return _state.get("why")  # type: ignore[return-value]


def usable(*tensors: torch.Tensor) -> bool:
    """True if the kernels can take these tensors: CPU float32 (no autocast elsewhere) and loaded."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return False
    return library() is not None


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())
