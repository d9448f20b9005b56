"""Builds tessel: the Python package (pymod -> tessel, kernels -> tessel.kernels)
and its C++ extension tessel._C (pybind11, numpy buffers, no torch headers).

Build with `pip install --no-build-isolation .` so the build sees the torch and
numpy already installed instead of resolving its own.
"""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# -march=native tunes for (and enables the SIMD of) the CPU that builds; the
# kernels pick AVX-512, AVX2 or SSE at compile time from what that enables.
# TESSEL_MARCH overrides it, e.g. TESSEL_MARCH=x86-64-v3 for a portable AVX2 build.
march = os.environ.get("TESSEL_MARCH", "native")

ext = Pybind11Extension(
    "tessel._C",
    sources=["csrc/bindings.cpp", "csrc/attention.cpp", "csrc/linear_attention.cpp", "csrc/looped.cpp",
             "csrc/compress.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", f"-march={march}", "-fopenmp", "-ffp-contract=fast"],
    extra_link_args=["-fopenmp"],
)

setup(
    name="tessel",
    version="0.1.0",
    description="Compiled attention, linear-attention and low-rank compression kernels for PyTorch",
    python_requires=">=3.10",
    packages=["tessel", "tessel.integrations", "tessel.kernels"],
    package_dir={"tessel": "pymod", "tessel.integrations": "pymod/integrations", "tessel.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"triton": ["triton==3.6.0"], "bench": ["tqdm", "matplotlib"]},
)
