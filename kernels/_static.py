"""Every Triton kernel compiled for a real GPU target, without a GPU.

The host code is the one source of truth for how a kernel is launched: the
launchers (attention_forward, linear_backward, ...) run on CPU tensors inside
`recorded_launches()`, which records each launch instead of running it (every
config an autotuner's pruning keeps, for autotuned kernels). A launch is then
bound the way Triton binds a real one (its specialisation of pointers and
integers, its constexprs and options) and compiled with triton.compile for a
GPUTarget (sm_80, sm_90, sm_100); ptxas -v reports registers, spills and
shared memory, and the PTX tells which tensor-core instructions are used.

Needs the kernels defined for real: import this module in a process without
TRITON_INTERPRET=1 (the tests run it in a subprocess).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from ._common import DTYPES, triton_interpreting

# Per-block shared memory (bytes) a kernel may use, registers and warps per SM.
TARGETS = {
    "sm_80": {"arch": 80, "shared": 163 * 1024, "regs": 65536, "max_warps": 64},
    "sm_90": {"arch": 90, "shared": 227 * 1024, "regs": 65536, "max_warps": 64},
    "sm_100": {"arch": 100, "shared": 227 * 1024, "regs": 65536, "max_warps": 64},
}


def device_target() -> str:
    """The TARGETS key of the current CUDA device (a clear error where its limits are not listed)."""
    major, minor = torch.cuda.get_device_capability()
    name = f"sm_{major}{minor}"
    if name not in TARGETS:
        raise ValueError(f"this GPU is {name}; the static report knows {', '.join(TARGETS)}")
    return name


# The ptxas and architecture name Triton uses for each target (the "a" variants have wgmma / tcgen05).
_PTXAS = {"sm_80": ("ptxas", "sm_80"), "sm_90": ("ptxas", "sm_90a"), "sm_100": ("ptxas-blackwell", "sm_100a")}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Launch:
    """One kernel launch as the host code makes it (for autotuned kernels, one per kept config)."""

    fn: JITFunction
    args: tuple
    kwargs: dict  # constexprs and options (num_warps, num_stages) as passed

    @property
    def name(self) -> str:
        return self.fn.__name__

    def config(self) -> str:
        """The launch's block shape and options, e.g. BLOCK_M=128 BLOCK_N=64 warps=4 stages=3."""
        shown = {k: v for k, v in self.kwargs.items() if k.isupper() and k.startswith("B")}
        text = " ".join(f"{k}={v}" for k, v in shown.items())
        return f"{text} warps={self.kwargs.get('num_warps', 4)} stages={self.kwargs.get('num_stages', 3)}".strip()


@contextlib.contextmanager
def recorded_launches():
    """Within the block, Triton launches are recorded (a list of Launch) and not run."""
    if triton_interpreting():
        raise RuntimeError("kernels compile for a GPU target only outside the interpreter (unset TRITON_INTERPRET)")
    launches: list[Launch] = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    def tuner_run(self, *args, grid, warmup, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            launches.append(Launch(self.fn, args, {**kwargs, **config.all_kwargs()}))
        self.nargs = None

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


@dataclass
class Compiled:
    """What the static report says of one compiled launch."""

    kernel: str
    config: str
    target: str
    registers: int
    spill_bytes: int  # register spill stores + loads per thread (ptxas -v)
    shared_bytes: int  # dynamic + static shared memory per block
    num_warps: int
    tensor_core: str  # "tcgen05", "wgmma", "mma" or "none"

    def occupancy_warps(self) -> int:
        """Resident warps per SM allowed by registers and shared memory (theoretical)."""
        spec = TARGETS[self.target]
        regs_per_warp = max(self.registers, 1) * 32
        by_regs = spec["regs"] // (regs_per_warp * self.num_warps) * self.num_warps
        by_shared = spec["shared"] // self.shared_bytes * self.num_warps if self.shared_bytes else spec["max_warps"]
        return min(by_regs, by_shared, spec["max_warps"])

    def problems(self) -> list[str]:
        """What a kernel must not do: spill registers or exceed the target's shared memory per block."""
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} bytes of registers to local memory per thread")
        if self.shared_bytes > TARGETS[self.target]["shared"]:
            out.append(f"needs {self.shared_bytes} bytes of shared memory (> {TARGETS[self.target]['shared']})")
        return out


def _bind(launch: Launch, backend):
    """(ASTSource, options) exactly as JITFunction.run binds a real launch, for `backend`'s target."""
    kwargs = {**launch.kwargs, "debug": launch.kwargs.get("debug", launch.fn.debug) or False,
              "instrumentation_mode": ""}
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(launch.fn, signature, constexprs, attrs), options


def _resource_usage(ptx: str, target: str) -> dict:
    """Registers, spill bytes (stores + loads) and static shared memory as ptxas -v reports them."""
    ptxas, arch = _PTXAS[target]
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([os.path.join(_BIN, ptxas), f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    number = lambda pattern: sum(int(x) for x in re.findall(pattern, log))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"),
            "spill": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
            "smem": number(r"(\d+) bytes smem")}


def _tensor_core(ptx: str) -> str:
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


@functools.lru_cache(maxsize=None)
def _backend(target: str):
    return make_backend(GPUTarget("cuda", TARGETS[target]["arch"], 32))


def _source(fn, seen: set) -> str:
    """fn's source with the @triton.jit functions and constexpr globals it names, recursively: what
    the compiled code depends on, without the line numbers Triton's own hash includes (an edit
    elsewhere in the file keeps the cache)."""
    seen.add(fn.__name__)
    parts = [fn.src]
    for name, value in sorted(fn.__globals__.items()):
        if name in seen or not re.search(rf"\b{re.escape(name)}\b", fn.src):
            continue
        if isinstance(value, JITFunction):
            parts.append(_source(value, seen))
        elif isinstance(value, tl.constexpr):
            seen.add(name)
            parts.append(f"{name} = {value!r}")
    return "\n".join(parts)


def _cache_key(src: ASTSource, options, target: str) -> str:
    # Without where libdevice lies (that path differs between checkouts; the Triton version fixes it).
    settings = sorted((k, v) for k, v in options.__dict__.items() if k != "extern_libs")
    text = "|".join([triton.__version__, target, _source(src.fn, set()), repr(sorted(src.signature.items())),
                     repr(sorted(src.constants.items())), repr(sorted(src.attrs.items())), repr(settings)])
    return hashlib.sha256(text.encode()).hexdigest()


def compile_launch(launch: Launch, target: str, cache: dict | None = None, used: set | None = None) -> Compiled:
    """Compile one recorded launch for `target` (a key of TARGETS); `cache`
    (key -> Compiled fields) skips what was compiled before from the same
    source, specialisation, options, target and Triton version; `used` gets
    the key."""
    backend = _backend(target)
    src, options = _bind(launch, backend)
    key = _cache_key(src, options, target)
    if used is not None:
        used.add(key)
    if cache is not None and key in cache:
        return Compiled(**cache[key])
    kernel = triton.compile(src, target=backend.target, options=options.__dict__)
    usage = _resource_usage(kernel.asm["ptx"], target)
    result = Compiled(launch.name, launch.config(), target, usage["registers"], usage["spill"],
                      kernel.metadata.shared + usage["smem"], options.num_warps, _tensor_core(kernel.asm["ptx"]))
    if cache is not None:
        cache[key] = result.__dict__
    return result


def load_cache(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save_cache(path: str, cache: dict) -> None:
    with open(path, "w") as f:
        json.dump(dict(sorted(cache.items())), f, indent=0)


# ---------------------------------------------------------------- what each family launches

ATTENTION_DIMS = (16, 64, 128, 256)
LINEAR_DIMS = (16, 64, 128)
LOOPED_DIMS = (6, 11, 21)  # d + 1


def _attention(dtype, d):
    from . import attention as k

    q, kk, v = (torch.randn(1, 4, 512, d, dtype=dtype) for _ in range(3))
    out, lse = k.attention_forward(q, kk, v, 0.1, -k.BAND_INF, 0)
    k.attention_forward(q[:, :, :1], kk, v, 0.1, -k.BAND_INF, k.BAND_INF, num_splits=4)  # decode: split-K
    k.attention_backward(torch.randn_like(q), q, kk, v, out, lse, None, 0.1, -k.BAND_INF, 0)
    # Packed sequences of 200 and 312 tokens, causal: (q_start, len_q, k_start, len_k, band_lo, band_hi).
    segments = torch.tensor([[0, 200, 0, 200, -201, 0], [200, 312, 200, 312, -313, 0]])
    q, kk, v = (x[0].transpose(0, 1) for x in (q, kk, v))
    out, lse = k.attention_varlen_forward(q, kk, v, segments, 312, 312, 0.1)
    k.attention_varlen_backward(torch.randn_like(q), q, kk, v, out, lse, None, segments, 312, 312, 0.1)


def _linear_attention(dtype, d):
    from . import linear_attention as k

    q, kk, v = (torch.randn(1, 4, 256, d, dtype=dtype) for _ in range(3))
    for causal, cu_seqlens in ((True, None), (False, None), (True, torch.tensor([0, 100, 256]))):
        _, state = k.linear_forward(q, kk, v, None, cu_seqlens, 0.1, causal)
        k.linear_backward(q, kk, v, None, cu_seqlens, state, torch.randn_like(q), None, 0.1, causal)


def _looped(dtype, d1):
    from . import looped as k

    Z, P, Q = torch.randn(64, d1, 41), torch.randn(1, 1, d1, d1), torch.randn(1, 1, d1, d1)
    _, saved, _ = k.looped_forward(Z, P, Q, 4, 40, 2)
    k.looped_backward(saved, P, Q, torch.randn_like(Z), 4, 40, 2)


def _compress(dtype, rank):
    from types import SimpleNamespace

    from . import compress as k

    grads = [torch.randn(768, 3072), torch.randn(300, 40)]
    group = SimpleNamespace(grads=grads, errors=[torch.randn(768, 3072), None], rank=rank,
                            p_parts=lambda P: [P[:rank * 768].view(rank, 768), P[rank * 768:].view(rank, 300)],
                            q_parts=lambda Q: [Q[:rank * 3072].view(rank, 3072), Q[rank * 3072:].view(rank, 40)])
    P, Q = torch.randn(rank * 1068), torch.randn(rank * 3112)
    ops = k.CompressOps()
    ops.project(group, P, Q, onto_p=True)
    ops.project(group, P, Q, onto_p=False)
    ops.reconstruct(group, P, Q, P, Q, torch.ones(1, dtype=torch.bool))
    ops.orthonormalize(P, [0], [768], rank, 1e-8)


# family -> (launching function, dtypes, sizes it is launched with)
FAMILIES = {
    "attention": (_attention, DTYPES, ATTENTION_DIMS),
    "linear_attention": (_linear_attention, DTYPES, LINEAR_DIMS),
    "looped": (_looped, (torch.float32,), LOOPED_DIMS),
    "compress": (_compress, (torch.float32,), (4, 16)),
}


def launches(family: str) -> list[tuple[str, Launch]]:
    """(case, launch) for every launch the family's host code makes over its dtypes and sizes."""
    fn, dtypes, sizes = FAMILIES[family]
    out = []
    for dtype in dtypes:
        for size in sizes:
            with recorded_launches() as recorded:
                fn(dtype, size)
            case = f"{str(dtype).removeprefix('torch.')}-{size}"
            out += [(case, launch) for launch in recorded]
    return out


def report(families=tuple(FAMILIES), targets=tuple(TARGETS), cache_path: str | None = None) -> list[dict]:
    """One row per (family, case, launch, target): what the compiled kernel uses. `cache_path`: a JSON
    file of earlier results keyed by source hash (read, then written back with what was compiled)."""
    cache = load_cache(cache_path) if cache_path else None
    work = [(family, case, launch, target) for family in families for case, launch in launches(family)
            for target in targets]
    rows, used = [], set()
    for family, case, launch, target in work:
        c = compile_launch(launch, target, cache, used)
        rows.append({"family": family, "case": case, **c.__dict__, "occupancy_warps": c.occupancy_warps(),
                     "problems": c.problems()})
    if cache_path:  # what this report used (a full one drops what no launch asks for any more)
        full = set(families) == set(FAMILIES) and set(targets) == set(TARGETS)
        save_cache(cache_path, {k: v for k, v in cache.items() if k in used or not full})
    return rows


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tessel.kernels._static", description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=tuple(TARGETS), action="append")
    parser.add_argument("--family", choices=tuple(FAMILIES), action="append")
    parser.add_argument("--cache", help="JSON of earlier results keyed by source hash (updated)")
    args = parser.parse_args()
    json.dump(report(tuple(args.family or FAMILIES), tuple(args.target or TARGETS), args.cache), sys.stdout)
