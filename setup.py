"""Builds tessel: the Python package (pymod -> tessel, kernels -> tessel.kernels)
and its C++ kernels, once per SIMD level: tessel._C_sse (x86-64-v2: SSE4.2),
tessel._C_avx2 (x86-64-v3: AVX2 + FMA), tessel._C_avx512 (x86-64-v4:
AVX-512) and tessel._C_avx512bf16 (x86-64-v4 + AVX512-BF16, whose bfloat16
dot products serve bfloat16 attention) on x86-64; tessel._C_neon (the compiler's default) on aarch64. At
import tessel picks the highest level the CPU supports (TESSEL_CPU_LEVEL forces
a lower one), so one build runs on any CPU of its architecture. tessel._C_ops,
built once against the installed torch, registers the attention ops in torch's
dispatcher and calls the chosen level's kernels (csrc/kernel_table.h).

Build with `pip install --no-build-isolation .` so the build sees the torch and
numpy already installed instead of resolving its own. TESSEL_CPU_LEVELS=avx2
(comma-separated) builds only those levels, for quick development builds.
"""
import glob
import os
import platform

import torch
from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup
from torch.utils.cpp_extension import CppExtension

# level -> its instruction-set flags (none: the compiler's default for the architecture)
if platform.machine().lower() in ("x86_64", "amd64"):
    LEVELS = {"sse": ["-march=x86-64-v2"], "avx2": ["-march=x86-64-v3"], "avx512": ["-march=x86-64-v4"],
              "avx512bf16": ["-march=x86-64-v4", "-mavx512bf16"]}
elif platform.machine().lower() in ("aarch64", "arm64"):
    LEVELS = {"neon": []}
else:
    LEVELS = {"generic": []}
# A header change rebuilds every extension (setuptools compares only the listed
# sources and depends with the built module).
HEADERS = sorted(glob.glob("csrc/*.h"))
wanted = os.environ.get("TESSEL_CPU_LEVELS")
if wanted:
    LEVELS = {level: LEVELS[level] for level in wanted.split(",")}


def extension(level: str, isa_flags: list[str]) -> Pybind11Extension:
    return Pybind11Extension(
        f"tessel._C_{level}",
        sources=["csrc/bindings.cpp", "csrc/attention.cpp", "csrc/linear_attention.cpp", "csrc/looped.cpp",
                 "csrc/compress.cpp"],
        include_dirs=["csrc"],
        depends=HEADERS,
        define_macros=[("TESSEL_MODULE", f"_C_{level}"), ("TESSEL_LEVEL", f'"{level}"')],
        cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast"] + isa_flags,
        extra_link_args=["-fopenmp"],
    )


def torch_ops() -> CppExtension:
    return CppExtension(
        "tessel._C_ops",
        sources=["csrc/ops.cpp"],
        include_dirs=["csrc"],
        depends=HEADERS,
        define_macros=[("_GLIBCXX_USE_CXX11_ABI", str(int(torch.compiled_with_cxx11_abi())))],
        extra_compile_args=["-O2", "-std=c++17"],
    )


ParallelCompile("TESSEL_BUILD_JOBS", default=0).install()  # the sources of a level compile in parallel

setup(
    name="tessel",
    version="0.1.0",
    description="Compiled attention, linear-attention and low-rank compression kernels for PyTorch",
    python_requires=">=3.10",
    packages=["tessel", "tessel.integrations", "tessel.kernels"],
    package_dir={"tessel": "pymod", "tessel.integrations": "pymod/integrations", "tessel.kernels": "kernels"},
    ext_modules=[extension(level, flags) for level, flags in LEVELS.items()] + [torch_ops()],
    cmdclass={"build_ext": build_ext},
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"triton": ["triton==3.6.0"], "bench": ["tqdm", "matplotlib"]},
)
