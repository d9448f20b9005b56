"""Every tessel op passes torch.library.opcheck: schema, fake (meta) kernel,
autograd registration and AOT dispatch checked together, on each backend that
runs here (C++; Triton in the interpreter)."""
import importlib
import importlib.util
import subprocess
import sys

import pytest
import torch

import tessel

# The modules (tessel.attention and tessel.linear_attention are also the functions' names).
attention, compress, linear_attention, looped = (importlib.import_module(f"tessel.{name}") for name in
                                                 ("attention", "compress", "linear_attention", "looped"))

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]


def rand(*shape, seed=0, dtype=torch.float32, grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.requires_grad_(grad)


def _plain(args):
    """The backward ops have no derivative of their own (no double backward): inputs without grad."""
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def samples(backend):
    """(op, args) for each op, small shapes (odd lengths, GQA, optional tensors given and not)."""
    q, k, v = rand(1, 4, 5, 16, seed=1, grad=True), rand(1, 2, 7, 16, seed=2, grad=True), rand(1, 2, 7, 16, seed=3,
                                                                                                    grad=True)
    out, lse = attention._attention_fwd(q, k, v, 0.25, -3, 2, backend)
    dout = rand(*out.shape, seed=4)
    yield attention._attention_fwd, (q, k, v, 0.25, -3, 2, backend)
    yield attention._attention_bwd, _plain((dout, q, k, v, out, lse, None, 0.25, -3, 2, backend))
    yield attention._attention_bwd, _plain((dout, q, k, v, out, lse, rand(*lse.shape, seed=5), 0.25, -3, 2, backend))
    pq, pk, pv = rand(9, 4, 16, seed=16, grad=True), rand(12, 2, 16, seed=17, grad=True), rand(12, 2, 16, seed=18,
                                                                                              grad=True)
    segments = attention._segments(torch.tensor([0, 4, 4, 9]), torch.tensor([0, 5, 7, 12]), True, (3, None))
    out, lse = attention._attention_varlen_fwd(pq, pk, pv, segments, 5, 5, 0.25, backend)
    yield attention._attention_varlen_fwd, (pq, pk, pv, segments, 5, 5, 0.25, backend)
    for dlse in (None, rand(*lse.shape, seed=19)):
        yield attention._attention_varlen_bwd, _plain((rand(*out.shape, seed=20), pq, pk, pv, out, lse, dlse,
                                                       segments, 5, 5, 0.25, backend))
    lk, lv = rand(1, 2, 5, 16, seed=6, grad=True), rand(1, 2, 5, 8, seed=7, grad=True)
    s0 = rand(1, 2, 16, 8, seed=8, grad=True)
    for causal, state0 in ((True, None), (False, s0)):
        yield linear_attention._linear_fwd, (q, lk, lv, state0, None, 0.5, causal, backend)
        _, state = linear_attention._linear_fwd(q, lk, lv, state0, None, 0.5, causal, backend)
        yield linear_attention._linear_bwd, _plain((q, lk, lv, state0, None, state, rand(1, 4, 5, 8, seed=9),
                                                    rand(1, 2, 16, 8, seed=10), 0.5, causal, backend))
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    packed_s0 = rand(3, 2, 16, 8, seed=21, grad=True)
    yield linear_attention._linear_fwd, (q, lk, lv, packed_s0, cu, 0.5, True, backend)
    _, state = linear_attention._linear_fwd(q, lk, lv, packed_s0, cu, 0.5, True, backend)
    yield linear_attention._linear_bwd, _plain((q, lk, lv, packed_s0, cu, state, rand(1, 4, 5, 8, seed=22),
                                                rand(3, 2, 16, 8, seed=23), 0.5, True, backend))
    Z, P, Q = rand(3, 4, 6, seed=11, grad=True), rand(1, 2, 4, 4, seed=12) * 0.1, rand(1, 2, 4, 4, seed=13) * 0.1
    P.requires_grad_(), Q.requires_grad_()
    yield looped._looped_fwd, (Z, P, Q, 3, 5, 2, backend)
    _, saved = looped._looped_fwd(Z, P, Q, 3, 5, 2, backend)
    yield looped._looped_bwd, _plain((saved, P, Q, rand(3, 4, 6, seed=14), 3, 5, 2, backend))
    yield compress._orthogonalize_op, (rand(2, 9, 3, seed=15), 1e-8, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_custom_op_passes_opcheck(backend):
    seen = set()
    for op, args in samples(backend):
        torch.library.opcheck(op, args)
        seen.add(op.name())
    assert seen == {f"tessel::{name}" for name in ("attention_fwd", "attention_bwd", "attention_varlen_fwd",
                                                    "attention_varlen_bwd", "linear_attention_fwd",
                                                    "linear_attention_bwd", "looped_fwd", "looped_bwd",
                                                    "compress_orthogonalize_")}, seen


@pytest.mark.parametrize("call", ["tessel.attention(x, x, x, causal=True)", "tessel.linear_attention(x, x, x)"])
def test_a_process_whose_first_call_is_compiled(call):
    """The SIMD level is chosen when the first op runs, not while dynamo traces (it cannot trace the import)."""
    code = ("import torch, tessel\n"
            f"f = torch.compile(lambda x: {call}, fullgraph=True, backend='aot_eager')\n"
            "x = torch.randn(1, 2, 9, 8, requires_grad=True)\n"
            "f(x).sum().backward()\n"
            "print(tessel.cpu_info()['level'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == tessel.cpu_info()["level"]
