"""tessel: compiled kernels for attention, linear-attention loops and low-rank
gradient compression, behind a thin PyTorch API."""
from . import compress, distributed, icl, nn
from ._dispatch import cpu_info, empty_cache, get_backend, set_backend, using_backend
from .attention import attention, attention_varlen, patch_sdpa, scaled_dot_product_attention
from .integrations.torch_sdpa import register_sdpa_provider
from .linear_attention import linear_attention
from .looped import looped_linear_attention

__all__ = [
    "attention",
    "attention_varlen",
    "compress",
    "cpu_info",
    "distributed",
    "empty_cache",
    "get_backend",
    "icl",
    "linear_attention",
    "looped_linear_attention",
    "nn",
    "patch_sdpa",
    "register_sdpa_provider",
    "scaled_dot_product_attention",
    "set_backend",
    "using_backend",
]
__version__ = "0.1.0"
