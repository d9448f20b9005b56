"""Test setup: without a GPU, Triton kernels run in the interpreter on CPU
(TRITON_INTERPRET=1, set before any kernel is defined); with one they run for
real. Every test starts with no backend forced."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tessel  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_backend(monkeypatch):
    """No backend chosen and no TESSEL_BACKEND: "auto"."""
    monkeypatch.delenv("TESSEL_BACKEND", raising=False)
    monkeypatch.setattr(tessel._dispatch, "_chosen", None)


def error_vs(ours: torch.Tensor, exact: torch.Tensor) -> float:
    """Max abs difference, NaN and inf included (a NaN anywhere is infinite error)."""
    ours, exact = ours.detach(), exact.detach()
    diff = (ours.double() - exact.double()).abs()
    both_inf = torch.isinf(ours) & torch.isinf(exact) & (torch.sign(ours) == torch.sign(exact))
    diff = torch.where(both_inf, torch.zeros_like(diff), diff)
    return float(torch.nan_to_num(diff, nan=float("inf")).max()) if diff.numel() else 0.0


def assert_as_accurate(name: str, ours, same_dtype_ref, exact, factor: float = 2.0, atol: float = 0.0):
    """FlashAttention's rule: our error against the float64 result is at most
    `factor` times what PyTorch's own same-dtype computation makes, plus atol."""
    ours_err = error_vs(ours, exact)
    ref_err = error_vs(same_dtype_ref, exact)
    assert ours_err <= factor * ref_err + atol, (
        f"{name}: error {ours_err:.3e} vs float64, PyTorch's own {ref_err:.3e} (allowed {factor}x + {atol:g})"
    )


def assert_backward_deterministic(fn, inputs):
    """Two backward passes of fn(*inputs).sum() give bit-identical gradients."""
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in inputs]
        fn(*leaves).sum().backward()
        grads.append([x.grad for x in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
