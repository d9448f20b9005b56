"""What each spawned worker of tests/test_distributed.py runs: a small model
trained with DDP on gloo, one communication hook per scenario, results saved
for the parent to compare."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

from tessel import distributed as td

STEPS = 12


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48), torch.nn.ReLU(),
                               torch.nn.Linear(48, 4))


def batch(rank, step):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(32, 32, generator=gen)
    return x, torch.sin(x[:, :4] * 2) + 0.1 * x[:, 4:8]


def make_state(kind, model, rank):
    if kind == "allreduce":
        return None, None
    if kind == "powersgd":
        return td.PowerSGDState(None, matrix_approximation_rank=2, start_powerSGD_iter=2, model=model), \
            td.powersgd_hook
    if kind == "powersgd_alternate":
        return td.PowerSGDState(None, 2, start_powerSGD_iter=2, alternate=True, model=model), td.powersgd_hook
    if kind == "laser":
        return td.LaserState(None, rank=2, power=1e4, model=model), td.laser_hook
    if kind == "zsgd":
        return td.ZSGDState(None, power=1e4, model=model), td.zsgd_hook
    if kind == "powersgd_full":  # every matrix at full rank: the exact average
        return td.PowerSGDState(None, 1000, start_powerSGD_iter=2, min_compression_rate=0, model=model), \
            td.powersgd_hook
    if kind == "mismatch":  # ranks disagree on the rank
        return td.PowerSGDState(None, 2 + 2 * rank, start_powerSGD_iter=2, model=model), td.powersgd_hook
    raise ValueError(kind)


def train(kind, rank, steps, start=None, overlap=True):
    """Losses of `steps` steps; `start` = (model, optimizer, hook) states to resume from; overlap=False
    runs each bucket on the autograd thread (the synchronous path)."""
    model = make_model()
    ddp = DDP(model)
    state, hook = make_state(kind, model, rank)
    if hook is not None:
        state.overlap = overlap
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = 0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        state.load_state_dict(start["hook"])
        first = start["step"]
    losses = []
    for step in range(first, first + steps):
        x, y = batch(rank, step)
        loss = F.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "hook": None if state is None else state.state_dict(), "step": first + steps}
    return losses, [p.detach().clone() for p in model.parameters()], checkpoint


def worker(rank, world, port, kinds, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for kind in kinds:
            if kind.endswith("+resume"):
                base = kind[: -len("+resume")]
                _, _, checkpoint = train(base, rank, STEPS // 2)
                # Through bytes, as a checkpoint file would.
                path = os.path.join(out_dir, f"ckpt{rank}.pt")
                torch.save(checkpoint, path)
                losses, params, _ = train(base, rank, STEPS - STEPS // 2, torch.load(path, weights_only=False))
                results[kind] = (losses, params)
            elif kind.endswith("+sync"):
                losses, params, _ = train(kind[: -len("+sync")], rank, STEPS, overlap=False)
                results[kind] = (losses, params)
            else:
                losses, params, _ = train(kind, rank, STEPS)
                results[kind] = (losses, params)
    except Exception as err:  # reported to the parent, which asserts on it
        results["error"] = f"{type(err).__name__}: {err}"
    leave(rank, results, out_dir)


def leave(rank, result, out_dir, teardown=True):
    """Save this worker's result for the parent, tear the group down, exit without interpreter finalisation.

    gloo's worker threads outlive destroy_process_group (the group stays referenced) and may still be
    dropping a finished work whose captured thread-local state holds a Python object: the context torch
    2.13 stashes during every backward (a collective issued inside it: DDP's, a hook's synchronous path) or
    a dispatch mode (host_reads). Its decref takes the GIL, and taking the GIL once finalisation has begun
    ends the thread inside a noexcept destructor: SIGABRT, "terminate called without an active exception"
    (seen in 1 run of ~30). Torch's at-exit race, not the hooks': a crash before this point still fails."""
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if teardown:
        dist.destroy_process_group()
    os._exit(0)


# ---------------------------------------------------------------- scenarios of the asynchronous hooks


class _Uneven(torch.nn.Module):
    """Layers of very different sizes: with 10 KB buckets, one huge matrix (96 x 3000) alone in its
    bucket, a wide LayerNorm whose vectors fill buckets of their own, and an unused branch."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.ReLU(), torch.nn.LayerNorm(96),
                                        torch.nn.Linear(96, 3000), torch.nn.ReLU(), torch.nn.LayerNorm(3000),
                                        torch.nn.Linear(3000, 40), torch.nn.ReLU(), torch.nn.Linear(40, 4))
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.body(x)


def uneven_model():
    torch.manual_seed(0)
    return _Uneven()


class _SyncCounter(TorchDispatchMode):
    """Counts host reads of tensor values (.item(), bool(tensor)) while active."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _uneven_ddp(kind, rank, bucket_cap_mb=0.01):
    """DDP over the uneven model with `kind`'s hook; the list gets each hooked bucket's index."""
    model = uneven_model()
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb, find_unused_parameters=True)
    state, hook = make_state(kind, model, rank)
    seen = []
    if hook is not None:
        def counted(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            seen.append(bucket.index())
            return hook(state, bucket)

        ddp.register_comm_hook(state, counted)
    return model, ddp, state, seen


def host_reads(rank, world, kinds, steps=6):
    """Host reads per backward, steps counted per backward, and buckets, for each hook."""
    out = {}
    for kind in kinds:
        model, ddp, state, seen = _uneven_ddp(kind, rank)
        reads, advanced = [], []
        for step in range(steps):
            x, y = batch(rank, step)
            loss = F.mse_loss(ddp(x), y)
            counter = _SyncCounter()
            before = None if state is None else state.compressor.iteration
            with counter:
                loss.backward()
            reads.append(counter.count)
            if state is not None:
                advanced.append(state.compressor.iteration - before)
            model.zero_grad()
        out[kind] = {"reads": reads, "steps": advanced, "buckets": len(set(seen))}
    return out


def bucket_order(rank, world, kind, steps=30):
    """Many uneven buckets over many steps: every rank must issue the same collectives in the same order."""
    model, ddp, _, seen = _uneven_ddp(kind, rank, bucket_cap_mb=0.005)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    for step in range(steps):
        x, y = batch(rank, step)
        loss = F.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "buckets": len(set(seen))}


def averages(rank, world, kind, steps=4):
    """Gradients after each backward (full-rank PowerSGD must give the exact average), and the
    shapes in each bucket of the last step."""
    model, ddp, state, seen = _uneven_ddp(kind, rank)
    grads, shapes = [], {}
    if state is not None:
        inner = state.gradient_names

        def names(bucket):  # the hook asks for names once per bucket: note the bucket's shapes
            shapes[bucket.index()] = [tuple(g.shape) for g in bucket.gradients()]
            return inner(bucket)

        state.gradient_names = names
    for step in range(steps):
        x, y = batch(rank, step)
        F.mse_loss(ddp(x), y).backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    return {"grads": grads, "bucket_shapes": list(shapes.values())}


def warmup_step(rank, world, power):
    """One LASER warm-up step: this worker's own gradients and what the hook returned."""
    model = make_model()
    x, y = batch(rank, 0)
    F.mse_loss(model(x), y).backward()
    local = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ddp = DDP(model, bucket_cap_mb=100)  # one bucket: the budget is per step
    ddp.register_comm_hook(td.LaserState(None, rank=2, power=power, start_iter=5, model=model), td.laser_hook)
    F.mse_loss(ddp(x), y).backward()
    return {"local": local, "received": [p.grad.clone() for p in model.parameters()]}


def dies(rank, world):
    """Rank 1 dies in the middle of a compressed backward; rank 0 must fail, not hang."""
    import time

    model, ddp, _, _ = _uneven_ddp("powersgd", rank)
    first = next(model.parameters())
    for step in range(6):
        if rank == 1 and step == 4:
            first.register_hook(lambda g: os._exit(3))  # mid-backward: later buckets were already sent
        x, y = batch(rank, step)
        loss = F.mse_loss(ddp(x), y)
        start = time.monotonic()
        try:
            loss.backward()
        except Exception as err:
            return {"failed_after_s": time.monotonic() - start, "message": f"{type(err).__name__}: {err}"}
        model.zero_grad()
    return {"failed_after_s": None}


def run(rank, world, port, scenario, args, out_dir, timeout_s):
    """Entry of a spawned worker: one scenario above, its result (or error) saved for the parent."""
    import datetime

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = globals()[scenario](rank, world, *args)
    except Exception as err:  # reported to the parent, which asserts on it
        result = {"error": f"{type(err).__name__}: {err}"}
    # "dies": the group lost a member there, so tearing it down could wait on the dead peer.
    leave(rank, result, out_dir, teardown=scenario != "dies")


def wait_each_bucket(rank, world, steps=4):
    """A caller that waits on each bucket's future before handing over the next (as torch's hooks allow)."""
    from bench.compress import FakeBucket

    state = td.PowerSGDState(None, 2, start_powerSGD_iter=2)
    shapes = [(64, 32), (48,), (40, 80), (16, 16)]
    gen = torch.Generator().manual_seed(rank)
    buckets = [FakeBucket(i, [s], i == len(shapes) - 1, gen) for i, s in enumerate(shapes)]  # one per bucket
    for _ in range(steps):
        outs = [td.powersgd_hook(state, b).wait().clone() for b in buckets]
    return {"finite": all(bool(torch.isfinite(o).all()) for o in outs), "iteration": state.iter}
