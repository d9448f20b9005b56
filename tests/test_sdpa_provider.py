"""tessel as torch's flash-attention provider (torch >= 2.13): registered on
request, never activated on import; once activated, F.scaled_dot_product_attention
calls that torch routes to its flash path run tessel's ops (a profiler trace
shows them), eagerly and inside torch.compile, with torch's outputs and
gradients; restore brings torch's kernels back."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

import tessel

pytestmark = pytest.mark.skipif(not hasattr(torch.nn.attention, "register_flash_attention_impl"),
                                reason="torch's flash-attention provider registry needs torch >= 2.13")


@pytest.fixture
def active():
    tessel.register_sdpa_provider()
    torch.nn.attention.activate_flash_attention_impl("tessel")
    yield
    torch.nn.attention.restore_flash_attention_impl()


def tessel_ops(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("tessel::")}


def make(h=4, hk=4, nq=37, nk=37, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, nq, d, generator=gen).to(dtype)
    k, v = (torch.randn(2, hk, nk, d, generator=gen).to(dtype) for _ in range(2))
    return q, k, v, torch.randn(q.shape, generator=gen).to(dtype)


def sdpa_with_grads(q, k, v, grad, **kw):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, **kw)
    return (out, *torch.autograd.grad(out, leaves, grad))


def test_importing_tessel_registers_and_activates_nothing():
    code = ("import torch, tessel; from torch.nn import attention as a; "
            "assert a.current_flash_attention_impl() is None and 'tessel' not in a.list_flash_attention_impls()")
    subprocess.run([sys.executable, "-c", code], check=True)


CASES = {
    "causal": dict(is_causal=True),
    "full": dict(),
    "gqa": dict(is_causal=True, enable_gqa=True),
    "lengths-differ": dict(nk=50),
    "bfloat16": dict(is_causal=True, dtype=torch.bfloat16),
    "scale": dict(scale=0.3),
    "bool-mask": dict(mask=torch.bool),
    "float-mask": dict(mask=torch.float32, is_causal=True),
}


@pytest.mark.parametrize("case", CASES)
def test_activated_sdpa_matches_torch(case):
    kw = dict(CASES[case])
    shape = {name: kw.pop(name) for name in ("nk", "dtype") if name in kw}
    q, k, v, grad = make(hk=2 if kw.get("enable_gqa") else 4, **shape)
    mask_dtype = kw.pop("mask", None)
    if mask_dtype is not None:
        gen = torch.Generator().manual_seed(5)
        mask = torch.rand(q.shape[2], k.shape[2], generator=gen) > 0.3
        kw["attn_mask"] = mask if mask_dtype == torch.bool else torch.randn(mask.shape, generator=gen)
    want = sdpa_with_grads(q, k, v, grad, **kw)
    tessel.register_sdpa_provider()
    torch.nn.attention.activate_flash_attention_impl("tessel")
    try:
        ops = tessel_ops(lambda: sdpa_with_grads(q, k, v, grad, **kw))
        got = sdpa_with_grads(q, k, v, grad, **kw)
    finally:
        torch.nn.attention.restore_flash_attention_impl()
    # A mask is what the band kernels do not take: that call runs the provider's masked softmax instead.
    assert ops == (set() if mask_dtype else {"tessel::attention_fwd", "tessel::attention_bwd"})
    tol = 2e-2 if q.dtype == torch.bfloat16 else 1e-5
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), name
        assert (a.float() - b.float()).abs().max() <= tol * max(1.0, b.float().abs().max().item()), name


def test_restore_brings_torch_back(active):
    q, k, v, grad = make()
    assert tessel_ops(lambda: sdpa_with_grads(q, k, v, grad)) == {"tessel::attention_fwd", "tessel::attention_bwd"}
    torch.nn.attention.restore_flash_attention_impl()
    assert tessel_ops(lambda: sdpa_with_grads(q, k, v, grad)) == set()
    torch.nn.attention.activate_flash_attention_impl("tessel")  # for the fixture's restore


def test_compiled_function_runs_tessel(active):
    torch._dynamo.reset()
    q, k, v, grad = make()

    def step(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = torch.compile(step)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ops = tessel_ops(lambda: torch.autograd.grad(compiled(*leaves), leaves, grad))
    assert ops == {"tessel::attention_fwd", "tessel::attention_bwd"}
    out = compiled(*leaves)
    got = (out, *torch.autograd.grad(out, leaves, grad))
    torch.nn.attention.restore_flash_attention_impl()
    want = sdpa_with_grads(q, k, v, grad, is_causal=True)
    torch.nn.attention.activate_flash_attention_impl("tessel")
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5


def test_torch_without_the_registry_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch.nn.attention, "register_flash_attention_impl")
    with pytest.raises(RuntimeError, match=r"needs torch >= 2.13 .* Use tessel.patch_sdpa\(\) instead"):
        tessel.register_sdpa_provider()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA flash path needs a GPU")
def test_activated_sdpa_on_cuda_matches_torch(active):
    q, k, v, grad = (x.cuda() for x in make(dtype=torch.float16))
    assert tessel_ops(lambda: sdpa_with_grads(q, k, v, grad, is_causal=True)) == {"tessel::attention_fwd",
                                                                                 "tessel::attention_bwd"}
    got = sdpa_with_grads(q, k, v, grad, is_causal=True)
    torch.nn.attention.restore_flash_attention_impl()
    want = sdpa_with_grads(q, k, v, grad, is_causal=True)
    torch.nn.attention.activate_flash_attention_impl("tessel")
    for a, b in zip(got, want):
        assert a.stride() == b.stride() and (a.float() - b.float()).abs().max() <= 1e-2
