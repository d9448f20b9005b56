"""Every Triton kernel, for every dtype it serves, representative sizes and
every autotune config its pruning keeps, compiles for sm_80, sm_90 and sm_100
without a GPU (tessel.kernels._static): no register spills, shared memory within the
target's per-block limit, and Hopper's wgmma for the half-precision attention
and linear-attention dot products whose blocks allow it.

The compiles run in a subprocess (the kernels must be defined outside the
interpreter). Results are cached in tests/data/triton_static.json by kernel
source, specialisation, options, target and Triton version: CI compiles only
what changed since the cache was written (a full compile takes ~30 min on 2
cores). After changing a kernel, refresh it with
`python -m tessel.kernels._static --cache tests/data/triton_static.json`."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

CACHE = os.path.join(os.path.dirname(__file__), "data", "triton_static.json")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tessel.kernels._static", "--cache", CACHE], env=env,
                          capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_kernel_is_compiled_for_both_targets(rows):
    kernels = {(r["family"], r["kernel"]) for r in rows}
    assert kernels == {
        ("attention", "_fwd_kernel"), ("attention", "_decode_combine_kernel"),
        ("attention", "_bwd_preprocess_kernel"), ("attention", "_bwd_dkdv_kernel"), ("attention", "_bwd_dq_kernel"),
        ("linear_attention", "_fwd_kernel"), ("linear_attention", "_bwd_dq_kernel"),
        ("linear_attention", "_bwd_dkdv_kernel"), ("looped", "_looped_fwd_kernel"),
        ("looped", "_looped_bwd_kernel"), ("compress", "_project_kernel"), ("compress", "_reconstruct_kernel"),
        ("compress", "_orthonormalize_kernel"),
    }, kernels
    assert {r["target"] for r in rows} == {"sm_80", "sm_90", "sm_100"}
    cases = {(r["family"], r["case"]) for r in rows}
    for dtype in ("float16", "bfloat16", "float32"):
        assert all(("attention", f"{dtype}-{d}") in cases for d in (16, 64, 128, 256))
        assert all(("linear_attention", f"{dtype}-{d}") in cases for d in (16, 64, 128))
    assert all(("looped", f"float32-{d1}") in cases for d1 in (6, 11, 21))


def test_device_target_names_the_gpu_or_says_it_is_unknown(monkeypatch):
    from tessel.kernels._static import device_target

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    assert device_target() == "sm_90"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 6))
    with pytest.raises(ValueError, match="this GPU is sm_86; the static report knows sm_80, sm_90, sm_100"):
        device_target()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the target of the GPU this runs on (make gpu-test)")
def test_the_device_target_is_compiled(rows):
    from tessel.kernels._static import device_target

    assert device_target() in {r["target"] for r in rows}


def test_no_spills_and_shared_memory_fits(rows):
    bad = [f"{r['target']} {r['family']} {r['case']} {r['kernel']} [{r['config']}]: {'; '.join(r['problems'])}"
           for r in rows if r["problems"]]
    assert not bad, "\n".join(bad)


def test_half_precision_attention_uses_wgmma_on_hopper(rows):  # sm_100's tcgen05: in the bench JSON
    """Blocks of at least 64 rows in the M dimension of the dot (one warpgroup's wgmma) in fp16 / bf16."""
    checked = 0
    for r in rows:
        if r["target"] != "sm_90" or r["family"] != "attention" or r["case"].startswith("float32"):
            continue
        blocks = dict(part.split("=") for part in r["config"].split() if "=" in part)
        rows_of_dot = {"_fwd_kernel": "BLOCK_M", "_bwd_dq_kernel": "BLOCK_M", "_bwd_dkdv_kernel": "BLOCK_N"}
        if r["kernel"] in rows_of_dot and int(blocks[rows_of_dot[r["kernel"]]]) >= 64:
            assert r["tensor_core"] == "wgmma", r
            checked += 1
    assert checked > 50, checked


def test_half_precision_linear_attention_uses_tensor_cores(rows):
    """fp16 / bf16 chunk products on tensor cores everywhere, wgmma on sm_90 from dims of 64 (dq: with
    64-token chunks; Triton takes mma.sync for its 32-token ones and for 16-wide tiles)."""
    half = [r for r in rows if r["family"] == "linear_attention" and not r["case"].startswith("float32")]
    assert len(half) > 200 and all(r["tensor_core"] != "none" for r in half)
    hopper = [r for r in half if r["target"] == "sm_90" and int(r["case"].split("-")[1]) >= 64
              and not (r["kernel"] == "_bwd_dq_kernel" and "BT=32" in r["config"])]
    assert len(hopper) > 50 and all(r["tensor_core"] == "wgmma" for r in hopper), \
        [(r["case"], r["kernel"], r["config"]) for r in hopper if r["tensor_core"] != "wgmma"]
