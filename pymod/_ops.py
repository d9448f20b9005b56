"""How an op reaches its kernel: the op registration of the families
registered from Python (attention's and linear attention's are registered
in C++: csrc/ops.cpp), the one dtype policy, and the bridge to the C++
extension's numpy buffers."""
from __future__ import annotations

import inspect

import torch
from torch.library import infer_schema

from . import _dispatch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What kernels accumulate in, what the C++ kernels compute in and what
    row statistics and states (lse, linear-attention states) are returned in:
    float64 for float64, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def numpy_view(x: torch.Tensor):
    """Zero-copy numpy view of a CPU tensor (what the C++ kernels' bindings take)."""
    return x.detach().numpy()


# The ops registered here are one fragment of the tessel namespace (attention's and linear attention's are
# defined in C++, csrc/ops.cpp); a registration lasts as long as its Library object.
_LIB = torch.library.Library("tessel", "FRAGMENT")


def kernel_op(family: str, direction: str, *, cpp, triton: str, finish=None, mutates_args=()):
    """Register the decorated function as the fake of op tessel::<family>_<direction>
    and return the op (torch.library.register_autograd takes it); its schema
    comes from that function's type annotations, whose last argument is the
    backend name. The op's body calls `cpp` (backend "cpp") or
    tessel.kernels.<family>.<triton> (backend "triton") with the other
    arguments, then `finish(result, *arguments)` where given (casts to the
    dtypes the fake promises, checks)."""

    def register(fake):
        params = list(inspect.signature(fake).parameters)
        mutated = [params.index(name) for name in mutates_args]

        def body(*args):
            *args, backend = args
            kernel = cpp if backend == "cpp" else getattr(_dispatch.triton_module(family), triton)
            result = kernel(*args)
            for i in mutated:  # written through numpy views or Triton pointers, which autograd does not see
                torch.autograd.graph.increment_version(args[i])
            return result if finish is None else finish(result, *args)

        # Defined with one kernel for every device, not as a torch.library.custom_op: a custom_op's kernel
        # imports torch._dynamo on its first call (1.2 s, once per process) and costs ~11 us more per call.
        name = f"{family}_{direction}"
        _LIB.define(name + infer_schema(fake, mutates_args=mutates_args))
        _LIB.impl(name, body, "CompositeExplicitAutograd")
        torch.library.register_fake(f"tessel::{name}", fake, lib=_LIB)
        return getattr(torch.ops.tessel, name).default

    return register
