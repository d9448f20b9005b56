"""Compress suite: orthogonalize_ against torch's Gram-Schmidt and QR, and the
PowerSGD communication hook per step against torch's powerSGD_hook,
batched_powerSGD_hook and plain all-reduce, on the gradients of a
ResNet-18-sized and a GPT-2-small-sized model (random tensors of those
shapes, in DDP's 25 MB buckets).

"compute" rows: one process (a world of 1 on gloo, so the collectives cost
~nothing): what the hook itself costs per step. "gloo-N" rows (extra_rows):
N local processes, wall time per step including the all-reduces, timed with a
fixed number of steps in lockstep on every process.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd
from torch.distributed.elastic.utils.distributed import get_free_port

from tessel import compress
from tessel import distributed as td

from ._harness import Case, timing_columns

BUCKET_BYTES = 25 * 2**20


def resnet18_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    chans = [(64, 64), (128, 64), (256, 128), (512, 256)]
    for i, (out, inp) in enumerate(chans):
        for block in range(2):
            cin = inp if block == 0 else out
            shapes += [(out, cin, 3, 3), (out,), (out,), (out, out, 3, 3), (out,), (out,)]
            if block == 0 and i > 0:
                shapes += [(out, inp, 1, 1), (out,), (out,)]
    return shapes + [(1000, 512), (1000,)]


def gpt2_small_shapes():
    d = 768
    shapes = [(50257, d), (1024, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


MODELS = {"resnet18": resnet18_shapes, "gpt2-small": gpt2_small_shapes}


class FakeBucket:
    """What a communication hook reads from DDP's GradBucket: a flat buffer
    and gradient views into it."""

    def __init__(self, index, shapes, last, gen):
        sizes = [torch.Size(s).numel() for s in shapes]
        self._buffer = torch.randn(sum(sizes), generator=gen) * 1e-2
        self._grads, offset = [], 0
        for shape, size in zip(shapes, sizes):
            self._grads.append(self._buffer[offset:offset + size].view(shape))
            offset += size
        self._index, self._last = index, last
        self._params = [torch.nn.Parameter(torch.empty(0)) for _ in shapes]

    def buffer(self):
        return self._buffer

    def gradients(self):
        return self._grads

    def index(self):
        return self._index

    def is_last(self):
        return self._last

    def parameters(self):
        return self._params


def make_buckets(shapes, seed=0):
    """DDP's bucketing: parameters in reverse order, buckets of at most 25 MB."""
    groups, current, size = [], [], 0
    for shape in reversed(shapes):
        nbytes = 4 * torch.Size(shape).numel()
        if current and size + nbytes > BUCKET_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(shape)
        size += nbytes
    groups.append(current)
    gen = torch.Generator().manual_seed(seed)
    return [FakeBucket(i, g, i == len(groups) - 1, gen) for i, g in enumerate(groups)]


def floats_sent(shapes, rank, min_rate=2.0):
    """Floats one worker sends per compressed step (both PowerSGD factors or
    the uncompressed tensor), the rule of tessel's and torch's hooks."""
    total = 0
    for s in shapes:
        n, m = s[0], torch.Size(s).numel() // s[0]
        r = min(rank, n, m)
        total += r * (n + m) if len(s) > 1 and (n + m) * r * min_rate < n * m else n * m
    return total


def _ensure_process_group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{get_free_port()}", rank=0, world_size=1)


def _hook_providers(rank, shapes, seed=0):
    """name -> a step (every bucket through the hook), each with its own buckets and state."""

    def step_fn(hook, state):
        buckets = make_buckets(shapes, seed)

        def step():
            for b in buckets:
                hook(state, b).wait()

        for _ in range(3):  # past start_powerSGD_iter = 2, and one compressed step
            step()
        return step

    providers = {
        "tessel": step_fn(td.powersgd_hook, td.PowerSGDState(None, rank, start_powerSGD_iter=2)),
        "torch_powersgd": step_fn(torch_psgd.powerSGD_hook, torch_psgd.PowerSGDState(None, rank, 2)),
        "allreduce": step_fn(default_hooks.allreduce_hook, None),
    }
    try:
        providers["torch_batched"] = step_fn(torch_psgd.batched_powerSGD_hook, torch_psgd.PowerSGDState(None, rank, 2))
    except AssertionError:
        # torch 2.11-2.13's batched hook hands a 2-D Q to its 3-D-only _orthogonalize once compressing.
        print(f"torch {torch.__version__}: batched_powerSGD_hook fails (AssertionError in _orthogonalize); left out")
    return providers


def _orth_cases(device, quick):
    out = []
    batches = [(64, 768, 4)] if quick else [(64, 768, 4), (64, 768, 16), (16, 3072, 4), (256, 64, 4)]
    for b, m, r in batches:
        M = torch.randn(b, m, r, device=device, generator=torch.Generator(device=device).manual_seed(0))
        work = M.clone()

        def ours(x=work, src=M):
            x.copy_(src)
            compress.orthogonalize_(x, 0.0)

        def torch_gs(x=work, src=M):
            x.copy_(src)
            torch_psgd._orthogonalize_gram_schmidt(x)

        def torch_qr(x=work, src=M):
            x.copy_(src)
            torch.linalg.qr(x)

        def err(x=M):
            a = compress.orthogonalize_(x.clone(), 0.0)
            return (a.mT @ a - torch.eye(x.shape[-1], device=x.device)).abs().max().item()

        out.append(Case("compress", f"orthogonalize-{b}x{m}x{r}", "orth", torch.float32, device, 0,
                        ours, None, {"torch_gram_schmidt": torch_gs, "torch_qr": torch_qr}, err,
                        bytes=2 * 4 * b * m * r * r))
    return out


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    out = _orth_cases(device, quick)
    if device != "cpu":
        return out  # the hook rows below run gloo on CPU tensors
    _ensure_process_group()
    plan = [("resnet18", 4)] if quick else [("resnet18", 1), ("resnet18", 4), ("resnet18", 16), ("gpt2-small", 4)]
    for model, rank in plan:
        shapes = MODELS[model]()
        providers = _hook_providers(rank, shapes)
        numel = sum(torch.Size(s).numel() for s in shapes)
        sent = floats_sent(shapes, rank)
        info = {"sent_mb": 4 * sent / 2**20, "ratio": numel / sent}
        # On one process the plain all-reduce is a division: the bound of no compression, not a rival.
        out.append(Case("compress", f"{model}-r{rank}", "compute", torch.float32, device, 0, providers["tessel"],
                        None, {k: v for k, v in providers.items() if k != "tessel"}, info=info,
                        bounds=("allreduce",)))
    return out


# ---------------------------------------------------------------- across processes

WALL_STEPS = 5


def _wall_times(rank, world, model, mrank, steps):
    """Seconds per step of each provider, all processes in lockstep (rank 0's clock)."""
    providers = _hook_providers(mrank, MODELS[model](), seed=rank)
    times = {}
    for name, step in providers.items():
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        dist.barrier()
        times[name] = (time.perf_counter() - start) / steps
    return times


def _wall_worker(rank, world, port, model, mrank, steps, out_path):
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    times = _wall_times(rank, world, model, mrank, steps)
    if rank == 0:
        torch.save(times, out_path)
    dist.destroy_process_group()
    # gloo's threads outlive the group: one still dropping a work that holds a Python object (a hook's
    # callback) aborts the process if interpreter finalisation has begun. The times are saved already.
    os._exit(0)


def _wall_row(device, world, model, rank, times):
    shapes = MODELS[model]()
    sent = floats_sent(shapes, rank)
    row = {"suite": "compress", "case": f"{model}-r{rank}", "mode": f"gloo-{world}", "dtype": "float32",
           "device": device, "sent_mb": 4 * sent / 2**20,
           "ratio": sum(torch.Size(s).numel() for s in shapes) / sent}
    row.update(timing_columns(times))
    return row


def _wall_plan(quick):
    return [(2, "resnet18", 4)] if quick else [(2, "resnet18", 4), (4, "resnet18", 4), (2, "gpt2-small", 4),
                                               (4, "gpt2-small", 4)]


def torchrun_rows(quick: bool) -> list[dict] | None:
    """Under `torchrun --nproc_per_node=N -m bench compress`: this process is one worker of the hook
    rows (env:// rendezvous, gloo); rank 0 gets the rows, the others None."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    rows = []
    for model in sorted({m for _, m, _ in _wall_plan(quick)}):
        times = _wall_times(rank, world, model, 4, 2 if quick else WALL_STEPS)
        rows.append(_wall_row("cpu", world, model, 4, times))
    dist.destroy_process_group()
    return rows if rank == 0 else None


def extra_rows(device: str, dtype: torch.dtype, quick: bool) -> list[dict]:
    if device != "cpu":
        return []
    rows = []
    for world, model, rank in _wall_plan(quick):
        port = get_free_port()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "times.pt")
            mp.start_processes(_wall_worker, args=(world, port, model, rank, 2 if quick else WALL_STEPS, path),
                               nprocs=world, start_method="spawn")
            times = torch.load(path)
        rows.append(_wall_row(device, world, model, rank, times))
    return rows
