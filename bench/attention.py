"""Attention suite: tessel.attention vs its reference and torch SDPA (each
fast CUDA backend forced, and flash-attn when installed, on CUDA), forward and
forward+backward; tessel.attention_varlen on packed sequences vs SDPA on the
zero-padded batch with a boolean mask and a loop of SDPA calls per sequence;
a Hugging Face Llama-style model on a right-padded batch with
attn_implementation="tessel" vs "sdpa" (when transformers is installed)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import tessel
from tessel.attention import attention_reference, attention_varlen_reference

from ._harness import Case, forward_backward_call, forward_call

# (B, H, Hkv, N, D): a tiny call (what a call costs beyond its arithmetic), the Markov study's models, small
# research transformers, then LLM-like shapes.
FULL = [
    (1, 1, 1, 1, 8),
    (32, 1, 1, 64, 16),
    (16, 1, 1, 128, 8),
    (32, 2, 2, 256, 32),
    (64, 1, 1, 128, 16),
    (16, 8, 8, 512, 64),
    (16, 4, 4, 2048, 128),
    (4, 8, 8, 1024, 64),
    (4, 8, 8, 4096, 64),
    (1, 32, 8, 2048, 128),
    (1, 8, 8, 16384, 64),
]
QUICK = [(1, 1, 1, 1, 8), (32, 2, 2, 256, 32), (4, 8, 8, 1024, 64)]
# H100 goal shapes: D=128, B*H*N = 16k*16.
CUDA_FULL = [(16 * 16384 // n // 16, 16, 16, n, 128) for n in (1024, 2048, 4096, 8192, 16384)]
# Decode against a KV cache, (B, H, Hkv, Nq, Nk, D): memory-bound, reported in GB/s.
CUDA_DECODE = [(8, 32, 32, 1, 32768, 128), (8, 32, 8, 1, 32768, 128), (8, 32, 32, 16, 32768, 128)]
CPU_DECODE = [(1, 32, 8, 1, 32768, 128), (1, 8, 8, 1, 65536, 128), (1, 32, 8, 4, 32768, 128)]
# Packed sequences (count, shortest, longest, H, D), causal: lengths uniform in [shortest, longest].
VARLEN = (64, 16, 1024, 8, 64)
VARLEN_QUICK = (16, 16, 512, 8, 64)
# Hugging Face Llama-style model (layers, width, heads, kv heads, batch, shortest, longest): right-padded batch.
HF_LLAMA = (4, 512, 8, 2, 8, 64, 512)
HF_LLAMA_QUICK = (2, 256, 8, 2, 4, 32, 256)
# The reference materialises scores, probabilities and their grads: leave it
# out of cases where those would pass this many bytes.
REFERENCE_BYTES = 2 * 2**30
# Forward+backward is left out beyond this length on CPU (minutes per call).
CPU_BACKWARD_MAX_N = 4096


def unmasked_pairs(n: int, causal: bool) -> int:
    return n * (n + 1) // 2 if causal else n * n


def peer_fns(device: str, causal: bool, gqa: bool) -> dict:
    """name -> f(q, k, v) for every peer available on this device."""
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    if device != "cuda":
        return {"sdpa": sdpa}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v)

        return run

    peers = {"sdpa_flash": forced(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": forced(SDPBackend.CUDNN_ATTENTION)}
    try:
        from flash_attn import flash_attn_func

        peers["flash_attn"] = lambda q, k, v: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        ).transpose(1, 2)
    except ImportError:
        pass
    return peers


def _output_error(ours, ref, inputs) -> float:
    with torch.no_grad():
        return (ours(*inputs).float() - ref(*inputs).float()).abs().max().item()


def _grad_error(ours, ref, leaves, grad) -> float:
    grads = []
    for fn in (ours, ref):
        forward_backward_call(fn, leaves, grad)()
        grads.append([x.grad.float().clone() for x in leaves])
    return max((a - b).abs().max().item() for a, b in zip(*grads))


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    shapes = QUICK if quick else (CUDA_FULL if device == "cuda" else FULL)
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for b, h, hk, n, d in shapes:
        q = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)
        k, v = (torch.randn(b, hk, n, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        grad = torch.randn(q.shape, device=device, dtype=dtype, generator=gen)
        with_ref = 3 * b * h * n * n * 4 <= REFERENCE_BYTES
        for causal in (False, True):
            name = f"B{b}-H{h}" + (f"/{hk}" if hk != h else "") + f"-N{n}-D{d}" + ("-causal" if causal else "")
            flops = 4 * b * h * unmasked_pairs(n, causal) * d
            ours = lambda q, k, v, c=causal: tessel.attention(q, k, v, causal=c)
            ref = lambda q, k, v, c=causal: attention_reference(q, k, v, causal=c)
            peers = peer_fns(device, causal, hk != h)
            out.append(Case(
                "attention", name, "fwd", dtype, device, flops,
                forward_call(ours, (q, k, v)),
                forward_call(ref, (q, k, v)) if with_ref else None,
                {p: forward_call(f, (q, k, v)) for p, f in peers.items()},
                (lambda o=ours, r=ref, x=(q, k, v): _output_error(o, r, x)) if with_ref else None,
            ))
            if device == "cpu" and n > CPU_BACKWARD_MAX_N:
                continue
            # Backward is 5 matmuls to the forward's 2: 3.5x the forward's FLOPs in all.
            out.append(Case(
                "attention", name, "fwd+bwd", dtype, device, 3.5 * flops,
                forward_backward_call(ours, leaves, grad),
                forward_backward_call(ref, leaves, grad) if with_ref else None,
                {p: forward_backward_call(f, leaves, grad) for p, f in peers.items()},
                (lambda o=ours, r=ref, lv=leaves, g=grad: _grad_error(o, r, lv, g)) if with_ref else None,
            ))
    if not quick:
        out += _decode_cases(device, dtype, gen)
    return out + _varlen_cases(device, dtype, quick, gen) + _huggingface_cases(device, dtype, quick)


def _padded(x, cu, longest):
    """(total, H, D) packed rows -> (batch, H, longest, D), zeros after each sequence."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    rows = torch.nn.utils.rnn.pad_sequence(list(x.split(lengths)), batch_first=True)
    return torch.nn.functional.pad(rows, (0, 0, 0, 0, 0, longest - rows.shape[1])).transpose(1, 2).contiguous()


def _varlen_cases(device, dtype, quick, gen) -> list[Case]:
    """What padding-free training runs: causal attention over packed sequences."""
    count, shortest, longest, h, d = VARLEN_QUICK if quick else VARLEN
    lengths = torch.randint(shortest, longest + 1, (count,), generator=torch.Generator().manual_seed(0))
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    padded_len = int(lengths.max())
    q, k, v = (torch.randn(int(cu[-1]), h, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
    grad = torch.randn(q.shape, device=device, dtype=dtype, generator=gen)
    padded = [_padded(x, cu, padded_len) for x in (q, k, v)]
    padded_grad = _padded(grad, cu, padded_len)
    valid = torch.arange(padded_len, device=device)[None, :] < lengths.to(device)[:, None]
    # Key j is seen by query i of sequence b iff j is a real token and j <= i.
    mask = valid[:, None, None, :] & torch.ones(padded_len, padded_len, device=device, dtype=torch.bool).tril()

    ours = lambda q, k, v: tessel.attention_varlen(q, k, v, cu, cu, padded_len, padded_len, causal=True)
    ref = lambda q, k, v: attention_varlen_reference(q, k, v, cu, cu, causal=True)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

    def sdpa_loop(q, k, v):
        return torch.cat([F.scaled_dot_product_attention(*(x[a:e].transpose(0, 1) for x in (q, k, v)),
                                                         is_causal=True).transpose(0, 1) for a, e in bounds])

    def sdpa_padded(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    name = f"varlen-{count}x{shortest}..{longest}-H{h}-D{d}-causal"
    flops = 4 * h * d * sum(unmasked_pairs(n, True) for n in lengths.tolist())
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    padded_leaves = [x.clone().requires_grad_() for x in padded]
    return [
        Case("attention", name, "fwd", dtype, device, flops,
             forward_call(ours, (q, k, v)), forward_call(ref, (q, k, v)),
             {"sdpa_padded": forward_call(sdpa_padded, padded), "sdpa_loop": forward_call(sdpa_loop, (q, k, v))},
             lambda: _output_error(ours, ref, (q, k, v))),
        Case("attention", name, "fwd+bwd", dtype, device, 3.5 * flops,
             forward_backward_call(ours, leaves, grad), forward_backward_call(ref, leaves, grad),
             {"sdpa_padded": forward_backward_call(sdpa_padded, padded_leaves, padded_grad),
              "sdpa_loop": forward_backward_call(sdpa_loop, leaves, grad)},
             lambda: _grad_error(ours, ref, leaves, grad)),
    ]


def _decode_cases(device, dtype, gen) -> list[Case]:
    """Few queries against a long KV cache: the split-K path. Its floor is
    reading K and V once."""
    out = []
    for b, h, hk, nq, nk, d in CUDA_DECODE if device == "cuda" else CPU_DECODE:
        q = torch.randn(b, h, nq, d, device=device, dtype=dtype, generator=gen)
        k, v = (torch.randn(b, hk, nk, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
        name = f"decode-B{b}-H{h}" + (f"/{hk}" if hk != h else "") + f"-Nq{nq}-Nk{nk}-D{d}"
        # Non-causal: torch's is_causal is top-left aligned, which is not decoding.
        ours = lambda q, k, v: tessel.attention(q, k, v)
        ref = lambda q, k, v: attention_reference(q, k, v)
        peers = peer_fns(device, False, hk != h)
        out.append(Case(
            "attention", name, "fwd", dtype, device, 4 * b * h * nq * nk * d,
            forward_call(ours, (q, k, v)), forward_call(ref, (q, k, v)),
            {p: forward_call(f, (q, k, v)) for p, f in peers.items()},
            (lambda o=ours, r=ref, x=(q, k, v): _output_error(o, r, x)),
            bytes=2 * k.numel() * k.element_size(),
        ))
    return out


def _huggingface_cases(device, dtype, quick) -> list[Case]:
    """A whole model's forward and training step (loss over the real tokens,
    backward) with attn_implementation="tessel" against "sdpa", same weights;
    the error column is the largest logit difference on real tokens."""
    try:
        import transformers
    except ImportError:
        return []
    from tessel.integrations import huggingface

    huggingface.register()
    layers, width, heads, kv_heads, b, shortest, longest = HF_LLAMA_QUICK if quick else HF_LLAMA
    # Llama-7B's MLP ratio (11008 / 4096 = 43 / 16).
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=width, intermediate_size=width * 43 // 16,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=longest)
    torch.manual_seed(0)
    models = {"sdpa": transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)}
    models["tessel"] = copy.deepcopy(models["sdpa"])
    for impl, model in models.items():
        model.set_attn_implementation(impl)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(shortest, longest + 1, (b,), generator=gen)
    ids = torch.randint(0, config.vocab_size, (b, int(lengths.max())), generator=gen).to(device)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).to(device=device, dtype=torch.long)
    labels = ids.masked_fill(mask == 0, -100)

    def forward(model):
        @torch.no_grad()
        def run():
            return model(input_ids=ids, attention_mask=mask).logits

        return run

    def train_step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

        return run

    def error():
        real = mask.bool()
        return (forward(models["tessel"])()[real].float() - forward(models["sdpa"])()[real].float()).abs().max().item()

    name = f"hf-llama-L{layers}-W{width}-H{heads}/{kv_heads}-pad{b}x{shortest}..{longest}"
    return [Case("attention", name, mode, dtype, device, 0.0, make(models["tessel"]), None,
                 {"hf_sdpa": make(models["sdpa"])}, error)
            for mode, make in (("fwd", forward), ("train", train_step))]
