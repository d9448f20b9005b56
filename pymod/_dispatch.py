"""Backend choice and the input checks shared by every op.

Each public op validates its inputs here once, then asks `resolve_backend`
which implementation serves its tensors:

- "cpp": tessel._C_<level>, C++ kernels for CPU tensors (float32, float64), at
  the highest SIMD level this CPU supports (cpu_info(); TESSEL_CPU_LEVEL forces
  a lower one);
- "triton": tessel.kernels, Triton kernels for CUDA tensors, or for CPU
  tensors when TRITON_INTERPRET=1 (how the GPU kernels are tested without one);
- "reference": the plain PyTorch reference beside each op, on any device.

"auto" (the default) picks by device. The choice is global, set with
`set_backend` or, when that was never called, the TESSEL_BACKEND environment
variable read at call time. A backend that cannot serve a tensor raises; it
never falls back silently.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import numbers
import os
from types import ModuleType

import numpy as np
import torch

from .kernels._common import triton_interpreting

BACKENDS = ("auto", "cpp", "triton", "reference")
_chosen: str | None = None


def set_backend(name: str) -> None:
    """Force one backend for every op ("auto", "cpp", "triton" or "reference")."""
    global _chosen
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _chosen = name


@contextlib.contextmanager
def using_backend(name: str):
    """set_backend(name) for a block; the previous choice comes back after it."""
    global _chosen
    previous = _chosen
    set_backend(name)
    try:
        yield
    finally:
        _chosen = previous


# TESSEL_BACKEND is read at every call (a test or a notebook may set it at any time), straight from os.environ's
# dict of encoded names: os.environ.get costs ~0.8 us when the name is unset (it raises and catches KeyError),
# a tenth of a tiny attention call.
_ENV_KEY = os.environ.encodekey("TESSEL_BACKEND")


def get_backend() -> str:
    """The backend in force: set_backend's choice, else TESSEL_BACKEND, else "auto"."""
    if _chosen is not None:
        return _chosen
    raw = os.environ._data.get(_ENV_KEY)
    if raw is None:
        return "auto"
    name = os.environ.decodevalue(raw)
    if name not in BACKENDS:
        raise ValueError(f"TESSEL_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(op: str, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device`, or a clear error."""
    name = get_backend()
    if name == "reference":
        return name
    kind = device.type
    if name == "auto":
        if kind == "cpu":
            name = "cpp"
        elif kind == "cuda":
            name = "triton"
        else:
            raise RuntimeError(f"tessel.{op}: no kernel for {kind} tensors (CPU and CUDA are served)")
    elif name == "cpp" and kind != "cpu":
        raise RuntimeError(f"tessel.{op}: backend 'cpp' serves CPU tensors only, got a {kind} tensor")
    elif name == "triton" and kind == "cpu" and not triton_interpreting():
        raise RuntimeError(
            f"tessel.{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)"
        )
    elif name == "triton" and kind not in ("cpu", "cuda"):
        raise RuntimeError(f"tessel.{op}: backend 'triton' serves CUDA tensors, got a {kind} tensor")
    if name == "cpp" and _cpu_module is None and not torch.compiler.is_compiling():
        # Choose the SIMD level now: the C++ ops run its kernels. (A graph being traced chooses it when it
        # first runs an op: dynamo cannot trace the import.)
        cpp_module()
    return name


# SIMD levels of the C++ kernels, lowest first (setup.py builds one module, tessel._C_<level>, per level).
CPU_LEVELS = ("sse", "avx2", "avx512", "avx512bf16", "neon", "generic")
_cpu_module: ModuleType | None = None


def cpu_info() -> dict:
    """The C++ kernels' SIMD: "level" in use, the levels this CPU "supports"
    and those "built" into this install, and the vector width in bits."""
    module = cpp_module()
    return {"level": module.level, "supported": list(module.cpu_levels()), "built": _built_levels(),
            "simd_bits": 8 * module.simd_bytes}


def empty_cache() -> int:
    """Gives back the scratch blocks the C++ kernels keep between calls
    (per thread, up to 64 MB each, so that calls do not page-fault their
    scratch in anew), on the calling thread and the OpenMP threads of
    torch.get_num_threads(); returns the bytes given back."""
    if _cpu_module is None:
        return 0
    return _cpu_module.release_scratch(torch.get_num_threads())


def _built_levels() -> list[str]:
    return [level for level in CPU_LEVELS if importlib.util.find_spec(f"tessel._C_{level}") is not None]


def cpp_module() -> ModuleType:
    """tessel._C_<level>: the highest level both built and supported by this
    CPU, or TESSEL_CPU_LEVEL's (chosen at the first call)."""
    global _cpu_module
    if _cpu_module is None:
        module = _load_cpu_level(os.environ.get("TESSEL_CPU_LEVEL"))
        from . import _C_ops  # the attention ops run the same level's kernels

        _C_ops.set_kernel_table(module.kernel_table())
        _cpu_module = module
    return _cpu_module


def _load_cpu_level(forced: str | None) -> ModuleType:
    built = _built_levels()
    if not built:
        raise ImportError("tessel's C++ kernels are not built (no tessel._C_<level> module): "
                          "pip install --no-build-isolation -e .")
    # The lowest level runs on any CPU of its architecture: ask it what this one supports.
    supported = list(importlib.import_module(f"tessel._C_{built[0]}").cpu_levels())
    usable = [level for level in built if level in supported]
    if forced is None:
        if not usable:
            raise RuntimeError(f"this CPU supports SIMD levels {supported}; tessel was built for {built}")
        return importlib.import_module(f"tessel._C_{usable[-1]}")
    if forced not in CPU_LEVELS:
        raise ValueError(f"TESSEL_CPU_LEVEL must be one of {CPU_LEVELS}, got {forced!r}")
    if forced not in supported:
        raise RuntimeError(f"TESSEL_CPU_LEVEL={forced}: this CPU supports only {supported}")
    if forced not in built:
        raise RuntimeError(f"TESSEL_CPU_LEVEL={forced}: this install was built for {built} only")
    return importlib.import_module(f"tessel._C_{forced}")


def triton_module(family: str) -> ModuleType:
    """tessel.kernels.<family>, or an error saying the Triton kernel is missing."""
    try:
        return importlib.import_module(f"tessel.kernels.{family}")
    except ModuleNotFoundError as err:
        raise NotImplementedError(
            f"tessel has no Triton kernel for {family} yet (tessel.kernels.{family}: {err}); "
            "use CPU tensors or tessel.set_backend('reference')"
        ) from None


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    """x must be a non-empty floating tensor of rank `ndim` (layout names the dims)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)} {layout}")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """All tensors on one device with one dtype."""
    first = tensors[0]
    device, dtype = first.device, first.dtype
    for i in range(1, len(tensors)):
        x = tensors[i]
        if x.device != device:
            raise ValueError(f"{names[i]} is on {x.device} but {names[0]} is on {device}: use one device")
        if x.dtype != dtype:
            raise TypeError(f"{names[i]} has dtype {x.dtype} but {names[0]} has {dtype}: use one dtype")


def is_number(x) -> bool:
    """A real number (Python's or numpy's), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_scale(scale) -> None:
    if scale is None:
        return
    if not is_number(scale) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")


def check_cu_seqlens(name: str, cu, total: int, device: torch.device) -> list[int] | None:
    """cu must be the cumulative lengths of packed sequences (1-D int32 or
    int64 on `device`, from 0 to `total`, never decreasing). Returns the
    lengths, or None while torch.compile traces (the values are data then)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of cumulative sequence lengths, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.shape[0] < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32 tensor (sequences + 1,), got shape {tuple(cu.shape)} "
                         f"{cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}: use one device")
    if torch.compiler.is_compiling():
        return None
    bounds = cu.tolist()
    lengths = [e - a for a, e in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths) < 0:
        shown = bounds if len(bounds) <= 8 else bounds[:4] + ["..."] + bounds[-2:]
        raise ValueError(f"{name} must rise from 0 to the packed length {total} without decreasing, got {shown}")
    return lengths
