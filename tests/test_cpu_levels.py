"""One build, every SIMD level: the C++ kernels are built once per level
(tessel._C_sse / _avx2 / _avx512 / _avx512bf16 on x86-64) and the highest one this CPU
supports is used unless TESSEL_CPU_LEVEL forces a lower one. Each level this
machine runs passes the kernels' cases against their references (and the
whole CPU attention suite from the wheel: test_wheel.py), and a level's
module holds no instruction of a higher one."""
import importlib
import importlib.util
import math
import os
import re
import shutil
import subprocess

import pytest
import torch
from conftest import error_vs

import tessel
from tessel import _C_ops, _dispatch
from tessel.attention import attention_reference, attention_varlen_reference
from tessel.linear_attention import linear_attention_reference

SUPPORTED = [level for level in _dispatch._built_levels()
             if level in _dispatch.cpp_module().cpu_levels()]
VECTOR_BITS = {"sse": 128, "avx2": 256, "avx512": 512, "avx512bf16": 512}
# What a level's code must not use: ymm (AVX) below avx2, zmm (AVX-512) below avx512, AVX512-BF16's
# instructions below avx512bf16.
FORBIDDEN = {"sse": r"%[yz]mm", "avx2": r"%zmm", "avx512": r"\bv(dpbf16ps|cvtne2?ps2bf16)\b"}


@pytest.fixture
def force_level(monkeypatch):
    def force(level):
        monkeypatch.setenv("TESSEL_CPU_LEVEL", level)
        monkeypatch.setattr(_dispatch, "_cpu_module", None)

    yield force
    _dispatch._cpu_module = None  # the next test chooses again, without the variable


def test_the_highest_supported_level_is_the_default():
    assert tessel.cpu_info()["level"] == SUPPORTED[-1]
    assert set(tessel.cpu_info()["built"]) >= set(SUPPORTED)


@pytest.mark.parametrize("level", SUPPORTED)
def test_every_level_matches_the_references(level, force_level):
    force_level(level)
    info = tessel.cpu_info()
    assert info["level"] == level and info["simd_bits"] == VECTOR_BITS.get(level, info["simd_bits"])
    assert _C_ops.kernel_level() == level  # the attention ops run this level's kernels too
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        q = torch.randn(2, 4, 37, 24, generator=gen, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(2, 2, 45, 24, generator=gen, dtype=dtype, requires_grad=True) for _ in range(2))
        for kw in (dict(causal=True), dict(window=(7, 3))):
            out = tessel.attention(q, k, v, **kw)
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            ref = attention_reference(q, k, v, **kw)
            ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            assert error_vs(out, ref) <= tol
            assert all(error_vs(g, r) <= 10 * tol for g, r in zip(grads, ref_grads))
    # Heads whose Q reaches 256 KB: the backward's 192-key blocks, which copy Q's and dO's rows per query block.
    for dtype, n in ((torch.float32, 1200), (torch.float64, 700)):
        lq, lk, lv = (torch.randn(1, 1, n, 100, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
        grads = torch.autograd.grad(tessel.attention(lq, lk, lv, causal=True).sum(), (lq, lk, lv))
        ref_grads = torch.autograd.grad(attention_reference(lq, lk, lv, causal=True).sum(), (lq, lk, lv))
        tol = 1e-4 if dtype == torch.float32 else 1e-11
        assert all(error_vs(g, r) <= tol for g, r in zip(grads, ref_grads))
    packed = [x.detach()[0].transpose(0, 1).float() for x in (q, k, v)]
    cu_q, cu_k = torch.tensor([0, 10, 10, 37], dtype=torch.int32), torch.tensor([0, 20, 21, 45], dtype=torch.int32)
    out = tessel.attention_varlen(*packed, cu_q, cu_k, 27, 24, causal=True)
    assert error_vs(out, attention_varlen_reference(*packed, cu_q, cu_k, causal=True)) <= 1e-5
    # Half-precision attention: converted while packing (float16 by F16C, or by hand at sse), bfloat16
    # multiplied as bfloat16 pairs at avx512bf16.
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(1, 4, 37, 21, generator=gen).to(dtype).requires_grad_() for _ in range(3))
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        out = tessel.attention(q, k, v, causal=True)
        ref = attention_reference(q64, k64, v64, causal=True)
        assert error_vs(out.double(), ref) <= error_vs(ref.detach().to(dtype).double(), ref) + 1e-5
        dout = torch.randn(out.shape, generator=gen).to(dtype)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
        assert all(error_vs(g.double(), r) <= 0.05 for g, r in zip(grads, ref_grads))
    # float16 converted while packing is the float32 kernel on the converted values, bit for bit, subnormals,
    # the largest finite value, inf and NaN included.
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen).half() for _ in range(3))
    q[0, 0, 3, :3] = torch.tensor([6e-8, -3e-5, 65504.0])
    k[0, 1, 5, :2] = torch.tensor([-6e-8, 1e-7])
    v[0, 0, 7, :3] = torch.tensor([float("inf"), float("nan"), 3e-6])
    out = tessel.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, tessel.attention(q.float(), k.float(), v.float(), causal=True).half(),
                               rtol=0, atol=0, equal_nan=True)
    lq, lk, lv = (torch.randn(1, 2, 70, 16, generator=gen) for _ in range(3))
    assert error_vs(tessel.linear_attention(lq, lk, lv), linear_attention_reference(lq, lk, lv)) <= 1e-4
    m = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    tessel.compress.orthogonalize_(m)
    assert error_vs(m.T @ m, torch.eye(4, dtype=torch.float64)) <= 1e-6  # eps = 1e-8 in the norms


@pytest.mark.parametrize("level", SUPPORTED)
def test_every_level_exp2_over_its_range(level, force_level):
    """The float32 exp2 (a table entry times a polynomial, 2^n added to the entry's exponent; one permute per
    level, or a lane loop) over arguments from 0 down to -120: one query row with V the identity gives the
    softmax itself, and out[j] / out[0] is exp2 of the kernel's own float32 argument (q = log2(e) rounded to
    float32, times the score, rounded once; the row maximum 0) up to the two roundings of the final scaling.
    250 keys: whole vectors and a tail."""
    force_level(level)
    n = 250
    scores = -torch.linspace(0, 120, n, dtype=torch.float64) / math.log2(math.e)
    q = torch.zeros(1, 1, 1, n)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n, n)
    k[0, 0, :, 0] = scores.float()
    out = tessel.attention(q, k, torch.eye(n).view(1, 1, n, n), scale=1.0)[0, 0, 0].double()
    log2e = torch.tensor(math.log2(math.e), dtype=torch.float32)
    args = (log2e * k[0, 0, :, 0]).double()  # float32 product, one rounding, as the kernel's
    rel = (out / out[0] / torch.exp2(args) - 1).abs().max().item()
    assert rel < 3e-7, rel  # exp2: 1.6e-7 measured (1.4 ulp), the scaling: two half-ulp roundings


@pytest.mark.parametrize("level", SUPPORTED)
def test_fma_peak_is_a_rate(level):
    """The FMA ceiling python -m bench prints: a finite positive rate, no work no flops."""
    module = importlib.import_module(f"tessel._C_{level}")
    rate = module.fma_peak_gflops(1, 1_000_000)
    assert 0 < rate < float("inf")
    assert module.fma_peak_gflops(1, 0) == 0


def test_forcing_a_level_the_cpu_lacks_or_that_does_not_exist(force_level, monkeypatch):
    force_level("mmx")
    with pytest.raises(ValueError, match=r"TESSEL_CPU_LEVEL must be one of"):
        tessel.cpu_info()
    lowest = _dispatch._built_levels()[0]
    module = importlib.import_module(f"tessel._C_{lowest}")
    monkeypatch.setattr(module, "cpu_levels", lambda: [lowest])
    higher = next((level for level in ("avx2", "avx512") if level != lowest), None)
    force_level(higher)
    with pytest.raises(RuntimeError, match=rf"TESSEL_CPU_LEVEL={higher}: this CPU supports only \['{lowest}'\]"):
        tessel.cpu_info()


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
@pytest.mark.parametrize("level", sorted(FORBIDDEN))
def test_a_level_uses_no_higher_levels_instructions(level):
    spec = importlib.util.find_spec(f"tessel._C_{level}")
    if spec is None:
        pytest.skip(f"tessel._C_{level} is not built here")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", spec.origin], capture_output=True, text=True,
                          check=True).stdout
    wider = [line for line in text.splitlines() if re.search(FORBIDDEN[level], line)]
    assert not wider, f"{os.path.basename(spec.origin)} uses a higher level's instructions: {wider[:3]}"
