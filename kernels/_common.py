"""What every Triton kernel module shares, host side: a leaf module (it imports
no part of tessel, and not triton either, so tessel's API may import it
without paying for Triton). Device-side helpers live in kernels/_tiles.py."""
from __future__ import annotations

import os

import torch

# Dtypes the Triton kernels load and store (they accumulate in fp32).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A band side this large is unbounded (the kernels accept any value past +-(Nq + Nk)).
BAND_INF = 1 << 50


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (Triton kernels run on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2_block(n: int, least: int = 16) -> int:
    """The power of two >= n and >= least (tl.dot needs blocks of 16 or more)."""
    return max(least, 1 << max(0, n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: tf32 for fp32 where torch allows it (not in the interpreter), else ieee."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not triton_interpreting():
        return "tf32"
    return "ieee"


def fma_dots(dtype: torch.dtype, precision: str) -> bool:
    """True where tl.dot runs on FMA units, not tensor cores: IEEE dots of fp32 inputs."""
    return precision == "ieee" and dtype == torch.float32


def strides3(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, N, D) tensor whose last dim is contiguous."""
    return x.stride(0), x.stride(1), x.stride(2)


def packed_as_batch(x: torch.Tensor) -> torch.Tensor:
    """Packed sequences (total, heads, D) as the (1, heads, total, D) view the
    attention kernels take (one segment per sequence)."""
    return x.transpose(0, 1).unsqueeze(0)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its last dim has stride 1 (any other strides are
    fine for the kernels), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.size(-1) == 1 else x.contiguous()


def measured_at(table: dict, kernel: str, dim: int) -> dict:
    """table[kernel, d] (what python -m bench gpu-static measured) for the smallest measured d >= dim,
    the largest measured d when dim is beyond them all."""
    dims = sorted(d for k, d in table if k == kernel)
    return table[kernel, next((d for d in dims if d >= dim), dims[-1])]


def least_bad(configs, cost: dict):
    """The configs a pruner keeps when every one of them is known bad: the cheapest (all that tie)."""
    best = min(cost[c] for c in configs)
    return [c for c in configs if cost[c] == best]
